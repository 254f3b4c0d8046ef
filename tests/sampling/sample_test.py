"""The sampling job and the Generator API on a `:tiny` tokenizer + generator trained here."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax import checkpointing, sharding, storage
from phenaki_jax.config import schema
from phenaki_jax.data import video_io
from phenaki_jax.eval import shapes_score
from phenaki_jax.generator import Generator, SamplingOptions
from phenaki_jax.sampling import sample as sample_job
from phenaki_jax.text import encoder as text_encoder
from tests.helpers import REPO, load_config

PROMPTS = ["a large red circle moves right", "a small blue square moves up"]


def _sample_config(gen_dir, **overrides):
  config = load_config("sample", "tiny")
  config.generator.workdir = gen_dir
  for k, v in overrides.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def test_same_seed_same_video_and_another_seed_another(generator):
  opts = SamplingOptions(num_steps=4, max_steps=8)
  a = generator.sample_tokens(PROMPTS, seed=3, options=opts)
  b = generator.sample_tokens(PROMPTS, seed=3, options=opts)
  c = generator.sample_tokens(PROMPTS, seed=4, options=opts)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert a.shape == (2, 3, 4, 4)
  assert a.min() >= 0 and a.max() < generator.model.codebook_size  # no [MASK] left


def test_a_frozen_prefix_is_kept_and_the_rest_generated(generator):
  prefix = np.arange(2 * 1 * 16).reshape(2, 1, 4, 4) % generator.model.codebook_size
  tokens = generator.sample_tokens(PROMPTS, seed=0, prefix_tokens=prefix,
                                   options=SamplingOptions(num_steps=3, max_steps=8))
  np.testing.assert_array_equal(tokens[:, :1], prefix)
  assert tokens.shape == (2, 3, 4, 4)


def test_guidance_scale_one_is_the_conditional_model(generator):
  """At scale 1 the guided logits are the conditional ones, so sampling equals
  decoding with the conditional logits alone (greedy, so no sampling noise)."""
  from phenaki_jax.sampling import parallel_decode
  opts = SamplingOptions(num_steps=3, max_steps=8, guidance_scale=1.0, temperature=1e-4,
                         choice_temperature=0.0)
  guided = generator.sample_tokens(PROMPTS, seed=0, options=opts)
  ids, mask = generator.encode_prompts(PROMPTS)
  context, cmask = text_encoder.encode_text(generator.text, generator.params, {},
                                             {"text_ids": jnp.asarray(ids),
                                              "text_mask": jnp.asarray(mask)})
  grid = generator.token_grid
  cond = parallel_decode.flat_logits_fn(
      lambda t: generator.model.apply({"params": generator.params["generator"]}, t, context,
                                      cmask), grid)
  start = jnp.full((2, int(np.prod(grid))), generator.model.mask_id, jnp.int32)
  out = jax.jit(lambda s: parallel_decode.decode(
      cond, jax.random.key(0), s, 3, mask_id=generator.model.mask_id, max_steps=8,
      temperature=1e-4, choice_temperature=0.0))(start)
  np.testing.assert_array_equal(guided.reshape(2, -1), np.asarray(out.tokens))


def test_guidance_schedules_start_and_end_where_they_say(generator):
  """With one step every token is decided at revealed = 0: 'increasing' is the
  conditional model (scale 1) there and 'decreasing' the full scale; with more
  steps a schedule changes the tokens a constant scale gives."""
  def tokens(steps, scale, schedule):
    return generator.sample_tokens(PROMPTS, seed=5, options=SamplingOptions(
        num_steps=steps, max_steps=8, guidance_scale=scale, guidance_schedule=schedule))
  np.testing.assert_array_equal(tokens(1, 6.0, "increasing"), tokens(1, 1.0, "constant"))
  np.testing.assert_array_equal(tokens(1, 6.0, "decreasing"), tokens(1, 6.0, "constant"))
  assert not np.array_equal(tokens(1, 6.0, "constant"), tokens(1, 1.0, "constant"))
  assert not np.array_equal(tokens(4, 6.0, "decreasing"), tokens(4, 6.0, "constant"))


def test_generate_makes_clips_and_images_of_the_tokenizer_frame_count(generator):
  opts = SamplingOptions(num_steps=2, max_steps=8)
  video = generator.generate(PROMPTS, options=opts)
  assert video.dtype == np.uint8 and video.shape == (2, 5, 16, 16, 3)
  image = generator.generate(PROMPTS, options=opts, num_frames=1)
  assert image.shape == (2, 1, 16, 16, 3)
  with pytest.raises(ValueError, match="num_frames=4"):
    generator.generate(PROMPTS, options=opts, num_frames=4)


class _SeenInputs:
  """The generator's module, recording the token grids the sampler feeds it."""

  def __init__(self, model):
    self.model, self.grids = model, []

  def __getattr__(self, name):
    return getattr(self.model, name)

  def apply(self, variables, tokens, *args, **kw):
    jax.debug.callback(lambda t: self.grids.append(np.asarray(t)), tokens)
    return self.model.apply(variables, tokens, *args, **kw)


def test_an_image_is_decoded_on_the_whole_grid_as_it_is_trained(generator):
  """Training pads an image to the clip's token frames with [MASK]: sampling must too."""
  from phenaki_jax import generator as generator_lib
  seen = _SeenInputs(generator.model)
  t, h, w = generator.token_grid
  n = generator.placement.batch_ways  # a whole batch for the mesh the weights are on
  ids, mask = generator.encode_prompts([PROMPTS[i % 2] for i in range(n)])
  with generator.placement.context():
    tokens = generator_lib._sample_tokens(  # pylint: disable=protected-access
        seen, generator.text, generator.params, generator.frozen_text_params, ids, mask,
        jax.random.key_data(jax.random.key(0)), np.full((n, 1, h, w), seen.mask_id, np.int32),
        3, 2.0, 1.0, 4.5, max_steps=8, top_k=None, schedule="cosine")
  assert tokens.shape == (n, 1, h, w) and (np.asarray(tokens) < seen.mask_id).all()
  assert len(seen.grids) == 3
  for grid in seen.grids:  # both CFG passes, every step
    assert grid.shape == (2 * n, t, h, w)
    assert (grid[:, 1:] == seen.mask_id).all()


def test_sample_job_writes_valid_mp4_png_and_json(trained, tmp_path):
  config = _sample_config(trained[1], **{"output.formats": "mp4,gif", "samples_per_prompt": 2})
  report = sample_job.run(config, str(tmp_path))
  assert len(report["samples"]) == 4  # 2 prompts × 2, in batches of 2
  assert [r["files"] for r in report["samples"]] == [[f"000{i}.mp4", f"000{i}.gif"]
                                                     for i in range(4)]
  for record in report["samples"]:
    mp4 = os.path.join(tmp_path, record["files"][0])
    frames = video_io.read_video(mp4, fps=None)
    assert frames.shape == (5, 16, 16, 3), mp4
    assert os.path.getsize(os.path.join(tmp_path, record["files"][1])) > 0  # the GIF
    # Prompts of the built-in grammar are scored.
    assert set(record["shapes"]["correct"]) >= {"colour", "shape", "all"}
  on_disk = json.load(open(tmp_path / "samples.json"))
  assert on_disk["generator"]["step"] == 3 and on_disk["tokenizer"]["step"] == 1
  assert on_disk["shapes_accuracy"]["num_clips"] == 4.0
  assert on_disk["tokenizer_ceiling"]["num_clips"] == 2.0  # one per distinct prompt
  assert on_disk["object_area_ratio"]["num_clips"] == 4.0
  assert on_disk["object_area_ratio"] == shapes_score.mean_area_ratios(
      (s["prompt"], shapes_score.area_ratio(
          s["prompt"], shapes_score.ClipReading(**s["shapes"]["read"]), 5, 16))
      for s in on_disk["samples"])
  wanted = config.prompts.split(";")
  assert [s["prompt"] for s in on_disk["samples"]] == [wanted[0]] * 2 + [wanted[1]] * 2
  from PIL import Image
  png = Image.open(tmp_path / "samples.png")
  assert png.size[1] > 4 * 16  # four labelled strips


def _read_remote_video(path):
  with storage.local_copy(path) as local:
    return video_io.read_video(local, fps=None)


def test_sample_job_same_seed_same_files_locally_and_in_a_bucket(trained, tmp_path, bucket):
  """The same run twice: into a local folder, and into a bucket with its prompts
  read from a prompt file there; the same videos either way."""
  config = _sample_config(trained[1])
  local = sample_job.run(config, str(tmp_path / "a"))
  prompts_file = f"{bucket}/prompts.txt"
  storage.write_text(prompts_file, "# the same prompts\n" + config.prompts.replace(";", "\n"))
  out = f"{bucket}/samples"
  remote = sample_job.run(_sample_config(trained[1], prompts="", prompts_file=prompts_file), out)
  assert [r["prompt"] for r in remote["samples"]] == [r["prompt"] for r in local["samples"]]
  assert remote["generator"]["workdir"] == trained[1]
  for a, b in zip(local["samples"], remote["samples"]):
    assert a["files"] == b["files"]
    np.testing.assert_array_equal(video_io.read_video(str(tmp_path / "a" / a["files"][0]),
                                                      fps=None),
                                  _read_remote_video(f"{out}/{b['files'][0]}"))
  assert storage.read_json(f"{out}/samples.json")["samples"] == remote["samples"]
  assert storage.read_bytes(f"{out}/samples.png")[:8] == b"\x89PNG\r\n\x1a\n"
  # Nothing but the outputs: no staged or temporary objects left behind.
  assert storage.listdir(out) == sorted(
      [f for r in remote["samples"] for f in r["files"]] + ["samples.json", "samples.png"])
  # A prompt file that is not in the bucket is named before anything loads.
  with pytest.raises(schema.ConfigError, match=f"config.prompts_file='{bucket}/missing.txt': "
                                               "no such file"):
    sample_job.run(_sample_config(trained[1], prompts_file=f"{bucket}/missing.txt"), out)


@pytest.mark.parametrize("key,value,message", [
    ("generator.workdir", "", "config.generator.workdir=''"),
    ("sampling.num_steps", 9, "config.sampling.num_steps=9"),
    ("sampling.guidance_scale", -1.0, "config.sampling.guidance_scale=-1.0"),
    ("sampling.guidance_schedule", "cosine", "config.sampling.guidance_schedule='cosine'"),
    ("output.formats", "avi", "config.output.formats='avi'"),
    ("num_frames", 0, "config.num_frames=0"),
    # Before any weight is read: a batch the 8 devices' mesh cannot split, a mesh they cannot fill.
    ("batch_size", 2, r"config.batch_size=2: must be divisible by the 8 ways the mesh \(8, 1, 1\)"),
    ("mesh.shape", (3, 1, 1), r"config.mesh.shape=\(3, 1, 1\).*the sampling mesh, over all 8"),
])
def test_bad_sample_config_fails_naming_the_key(trained, tmp_path, key, value, message):
  config = _sample_config(trained[1], **{key: value})
  with pytest.raises(schema.ConfigError, match=message):
    sample_job.run(config, str(tmp_path))


def test_missing_generator_checkpoint_says_how_to_train_one(tmp_path):
  with pytest.raises(FileNotFoundError, match="configs/maskgit.py"):
    sample_job.run(_sample_config(str(tmp_path / "nothing")), str(tmp_path / "out"))


def test_command_line_with_prompts(trained, tmp_path):
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "phenaki_jax.main", "--config=configs/sample.py:tiny",
         f"--workdir={out}", f"--config.generator.workdir={trained[1]}",
         "--config.prompts=a large green triangle moves down;a small white circle;"
         "a dog runs on a beach"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.load(open(out / "samples.json"))
  assert [s["prompt"] for s in report["samples"]] == [
      "a large green triangle moves down", "a small white circle", "a dog runs on a beach"]
  assert all(os.path.exists(out / s["files"][0]) for s in report["samples"])
  # A prompt outside the built-in grammar is sampled, just not scored.
  assert "shapes" in report["samples"][0] and "shapes" not in report["samples"][2]


class _FakeTokenizer:
  """Encodes a clip as itself; decoding applies `damage` (floats in [-1, 1])."""

  def __init__(self, damage):
    self.damage = damage

  def encode(self, frames):
    return np.asarray(frames, np.float32) / 127.5 - 1.0

  def decode(self, codes):
    return self.damage(codes)


class _FakeGenerator:
  def __init__(self, damage):
    self.tokenizer = _FakeTokenizer(damage)


def test_tokenizer_ceiling_scores_the_reconstructions_of_the_prompts_clips():
  prompts = ["a large red circle moves right", "a small blue square moves up",
             "the green triangle moves left", "a dog runs on a beach"]
  perfect = sample_job.tokenizer_ceiling(_FakeGenerator(lambda x: x), prompts, 11, 64, 3)
  # The story prompt names no size and the last is not a shapes prompt: two clips.
  assert perfect == {"colour": 1.0, "shape": 1.0, "size": 1.0, "motion": 1.0, "all": 1.0,
                     "num_clips": 2.0}

  def fill_bounding_boxes(x):  # every object becomes a square; colour, size, motion kept
    out = np.full_like(x, -1.0)
    for b, t in np.ndindex(x.shape[:2]):
      ys, xs = np.nonzero((x[b, t] > 0).any(-1))
      colour = x[b, t, ys, xs].max(axis=0)
      out[b, t, ys.min():ys.max() + 1, xs.min():xs.max() + 1] = colour
    return out

  squared = sample_job.tokenizer_ceiling(_FakeGenerator(fill_bounding_boxes), prompts, 11, 64, 3)
  # The circle is lost, the square stays one.
  assert squared == {"colour": 1.0, "shape": 0.5, "size": 1.0, "motion": 1.0, "all": 0.5,
                     "num_clips": 2.0}
  assert sample_job.tokenizer_ceiling(_FakeGenerator(lambda x: x), prompts[2:], 11, 64, 3) is None


# --- On a mesh: the weights sharded by the rules, the batch split, the same videos.

def _mesh(shape):
  return sharding.make_mesh(shape, jax.devices()[:int(np.prod(shape))])


@pytest.fixture
def reads(monkeypatch):
  """Every checkpoint read: (step, target) (Checkpointer.restore / restore_latest read
  through _restore_here)."""
  calls, restore = [], checkpointing.Checkpointer._restore_here  # pylint: disable=protected-access

  def spy(self, step, abstract_state, data_iterator, partial):
    assert partial  # a part of the checkpoint only
    calls.append((step, abstract_state))
    return restore(self, step, abstract_state, data_iterator, partial)

  monkeypatch.setattr(checkpointing.Checkpointer, "_restore_here", spy)
  return calls


def test_on_a_mesh_with_model_axes_the_sample_job_writes_the_one_device_videos(
    trained, generator, reads, tmp_path):
  """config.mesh.shape=(2,2,2): weights split by fsdp and tensor, the batch 4 ways (3
  prompts padded in a batch of 4); the videos of one device, and the tokens of the
  default mesh (8-way data parallel, the batch padded to 8)."""
  keys = {"batch_size": 4, "prompts": "a dog runs on a beach;a cat sleeps;a bird flies",
          "output.formats": "mp4"}
  config = _sample_config(trained[1], **keys, **{"mesh.shape": (2, 2, 2)})
  sharded = sample_job.load_generator(config)
  config_one = _sample_config(trained[1], **keys)  # (-1, 1, 1) over the one device
  one = sample_job.load_generator(config_one, devices=jax.devices()[:1])
  # The EMA weights only, of the generator (and its trained text encoder) and the tokenizer.
  assert [sorted(target) for _, target in reads] == [["ema_params"]] * 4
  assert set(sharded.params) == {"generator", "text_encoder"}
  axes = {a for x in jax.tree.leaves(sharded.params) for s in x.sharding.spec if s
          for a in ((s,) if isinstance(s, str) else s)}
  assert {"fsdp", "tensor"} <= axes
  assert sharded.tokenizer.mesh is sharded.mesh and sharded.placement.batch_ways == 4
  assert dict(one.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}

  prompts = sample_job.read_prompts(config)
  options = SamplingOptions.from_config(config.sampling)
  eight = sample_job.run_prompts(config, str(tmp_path / "eight"), sharded, prompts, options,
                                 ["mp4"], 0.0)
  single = sample_job.run_prompts(config_one, str(tmp_path / "one"), one, prompts, options,
                                  ["mp4"], 0.0)
  assert eight["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert eight["samples"] == single["samples"] and len(single["samples"]) == 3
  for record in single["samples"]:
    name = record["files"][0]
    np.testing.assert_array_equal(video_io.read_video(str(tmp_path / "eight" / name), fps=None),
                                  video_io.read_video(str(tmp_path / "one" / name), fps=None))
  batch = prompts + prompts[-1:]  # the job's one padded batch, its seed
  np.testing.assert_array_equal(generator.sample_tokens(batch, seed=config.seed, options=options),
                                one.sample_tokens(batch, seed=config.seed, options=options))


def test_a_mesh_the_generator_weights_do_not_split_on_is_refused(trained, reads):
  # The :tiny generator's 2 heads cannot split 8 ways; nothing is read.
  with pytest.raises(ValueError, match=r"do not split evenly on the mesh \{'data': 1, 'fsdp': 1, "
                                       r"'tensor': 8\} by its config.logical_axis_rules: .*"
                                       r"\['kernel'\] \(32, 2, 16\) over \('fsdp', 'tensor'"):
    Generator.load(trained[1], mesh=_mesh((1, 1, 8)))
  assert not reads


def test_processes_other_than_0_sample_the_same_and_write_nothing(generator, tmp_path,
                                                                  monkeypatch):
  """What every process but process 0 of a multi-host job does (the 2-process run is
  tests/integration): the same batches and report, no file."""
  config = schema.complete(_sample_config("unused"))
  options = SamplingOptions.from_config(config.sampling)
  written = sample_job.run_prompts(config, str(tmp_path / "p0"), generator, PROMPTS, options,
                                   ["mp4", "gif"], 0.0)
  monkeypatch.setattr(sample_job, "is_writer", lambda: False)
  other = sample_job.run_prompts(config, str(tmp_path / "p1"), generator, PROMPTS, options,
                                 ["mp4", "gif"], 0.0)
  assert other["samples"] == written["samples"]
  story = sample_job.run_story(config, str(tmp_path / "p1"), generator,
                               sample_job.read_story(_sample_config("unused", story=PROMPTS[0])),
                               options, ["mp4", "gif"], 0.0)
  assert story["files"] == ["story.mp4", "story.gif"] and story["num_frames"] == 5
  assert not (tmp_path / "p1").exists()
  assert sorted(os.listdir(tmp_path / "p0")) == [
      "0000.gif", "0000.mp4", "0001.gif", "0001.mp4", "samples.json", "samples.png"]


def test_a_sample_depends_on_its_prompt_and_seed_not_on_its_batch(generator):
  opts = SamplingOptions(num_steps=3, max_steps=8)
  prompts = ["a large red circle moves right", "a small blue square moves up",
             "a large green triangle moves left"]
  together = generator.sample_tokens(prompts, seed=10, options=opts)
  for i, prompt in enumerate(prompts):
    alone = generator.sample_tokens([prompt], seed=10 + i, options=opts)
    np.testing.assert_array_equal(alone[0], together[i])
  # Other neighbours, the same example: the same tokens.
  swapped = generator.sample_tokens([prompts[2], prompts[1]], seed=10, options=opts)
  np.testing.assert_array_equal(swapped[1], together[1])
  assert not np.array_equal(together[0], generator.sample_tokens(prompts[:1], seed=11,
                                                                 options=opts)[0])
