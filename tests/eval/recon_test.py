"""SSIM against a NumPy reference, PSNR, LPIPS, codebook statistics, the evaluator."""
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax.pretrained import perceptual
from phenaki_jax.eval import fvd, recon


def _reference_ssim(a, b, data_range=1.0):
  """Wang et al. 2004 written out: every 11×11 window position, weighted sums."""
  x = np.arange(11) - 5.0
  g = np.exp(-0.5 * (x / 1.5) ** 2)
  window = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  out = []
  for img_a, img_b in zip(a.astype(np.float64), b.astype(np.float64)):
    h, w, channels = img_a.shape
    values = []
    for c in range(channels):
      for i in range(h - 10):
        for j in range(w - 10):
          pa, pb = img_a[i:i + 11, j:j + 11, c], img_b[i:i + 11, j:j + 11, c]
          mu_a, mu_b = np.sum(window * pa), np.sum(window * pb)
          var_a = np.sum(window * (pa - mu_a) ** 2)
          var_b = np.sum(window * (pb - mu_b) ** 2)
          cov = np.sum(window * (pa - mu_a) * (pb - mu_b))
          values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                        / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    out.append(np.mean(values))
  return np.array(out)


def _images(seed, n=3, size=20):
  rng = np.random.default_rng(seed)
  # Smooth structure plus texture, like frames rather than pure noise.
  yy, xx = np.mgrid[:size, :size] / size
  base = 0.5 + 0.3 * np.sin(6 * xx[..., None] + 4 * yy[..., None] + rng.uniform(0, 6, (n, 1, 1, 3)))
  return np.clip(base + 0.1 * rng.normal(size=(n, size, size, 3)), 0, 1).astype(np.float32)


def test_ssim_matches_numpy_reference():
  a = _images(0)
  b = np.clip(a + 0.15 * np.random.default_rng(1).normal(size=a.shape), 0, 1).astype(np.float32)
  np.testing.assert_allclose(np.asarray(recon.ssim(a, b)), _reference_ssim(a, b), atol=2e-5)
  # Another data range: [0, 255].
  np.testing.assert_allclose(np.asarray(recon.ssim(a * 255, b * 255, data_range=255.0)),
                             _reference_ssim(a * 255, b * 255, 255.0), atol=2e-5)


def test_ssim_is_one_on_identical_images_and_falls_with_noise():
  a = _images(2, size=32)
  np.testing.assert_allclose(np.asarray(recon.ssim(a, a)), 1.0, atol=1e-5)
  rng = np.random.default_rng(3)
  scores = [float(np.mean(recon.ssim(a, np.clip(a + s * rng.normal(size=a.shape), 0, 1))))
            for s in (0.02, 0.05, 0.1, 0.3)]
  assert all(x > y for x, y in zip(scores, scores[1:])), scores
  with pytest.raises(ValueError, match="11x11"):
    recon.ssim(a[:, :8, :8], a[:, :8, :8])


def test_psnr_known_value():
  a = np.zeros((2, 3, 4, 4, 3), np.float32)
  b = a + 0.1  # mse 0.01 on range 1 -> 20 dB
  np.testing.assert_allclose(np.asarray(recon.psnr(a, b)), [20.0, 20.0], rtol=1e-5)


@pytest.mark.parametrize("net,size", [("alexnet", 32), ("vgg16", 16)])
def test_lpips_is_zero_on_identical_images_and_positive_otherwise(net, size):
  params = perceptual.lpips_params(net)
  a = _images(4, n=2, size=size) * 2 - 1
  b = _images(5, n=2, size=size) * 2 - 1
  same = np.asarray(perceptual.lpips_distance(params, a, a, net=net))
  different = np.asarray(perceptual.lpips_distance(params, a, b, net=net))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  assert np.all(different > 1e-3), different


def test_codebook_statistics():
  counts = recon.code_histogram(np.array([[0, 1], [2, 3]]), 8)
  np.testing.assert_array_equal(counts, [1, 1, 1, 1, 0, 0, 0, 0])
  stats = recon.codebook_stats(counts)
  assert stats["codebook_usage"] == 0.5
  assert stats["codebook_perplexity"] == pytest.approx(4.0)  # uniform over 4 codes
  assert recon.codebook_stats(recon.code_histogram(np.zeros(10, int), 8)) == {
      "codebook_usage": 0.125, "codebook_perplexity": 1.0}
  with pytest.raises(ValueError, match="outside"):
    recon.code_histogram(np.array([8]), 8)


def test_lpips_frame_selection_is_even_and_includes_the_ends():
  assert recon.lpips_frame_indices(11, 4) == (0, 3, 7, 10)
  assert recon.lpips_frame_indices(5, -1) == (0, 1, 2, 3, 4)
  assert recon.lpips_frame_indices(5, 9) == (0, 1, 2, 3, 4)


class _FakeFeatures:
  """Stands in for I3D: cheap per-clip features, and counts the clips it sees."""
  num_frames = 9

  def __init__(self):
    self.clips_seen = 0

  def __call__(self, clips):
    clips = np.asarray(clips, np.float64)
    if clips.dtype != np.float64 or clips.max() > 1.5:
      clips = clips / 127.5 - 1.0
    self.clips_seen += len(clips)
    feats = clips.reshape(len(clips), -1)[:, :400]
    return feats + 0.01 * np.arange(400)

  def stats(self, clips):
    return fvd.FeatureStats.from_features(self(clips))

  def protocol(self):
    return {"fvd_features": "fake"}


def test_evaluator_on_an_identity_tokenizer():
  clips = np.random.default_rng(0).integers(0, 256, (5, 9, 16, 16, 3), dtype=np.uint8)
  seen_shapes = []

  def reconstruct(frames):
    # Codes 0, 1, 2, … in clip order, two per clip.
    start = 2 * 2 * len(seen_shapes)
    seen_shapes.append(frames.shape)
    return frames, (start + np.arange(frames.shape[0] * 2).reshape(-1, 2)) % 16

  protocol = {"fvd": True, "fvd_resolution": 224, "fvd_num_frames": 9, "lpips_net": "vgg16",
              "lpips_frames_per_clip": 3, "batch_size": 2}
  evaluator = recon.ReconstructionEvaluator(clips, protocol, codebook_size=16,
                                            source={"data": "test", "seed": 3})
  fake = _FakeFeatures()
  evaluator.fvd = fake
  result = evaluator(reconstruct)
  m = result.metrics
  assert m["psnr"] == pytest.approx(100.0, abs=1e-3)  # the 1e-10 MSE floor
  assert m["ssim"] == pytest.approx(1.0, abs=1e-5)
  assert m["lpips"] == pytest.approx(0.0, abs=1e-6)
  assert m["rfvd"] == pytest.approx(0.0, abs=1e-6)
  assert m["tokens_per_clip"] == 2.0 and result.token_grid == (2,)
  # Codes of the 5 real clips only (0 … 9; the padded sixth clip's are dropped).
  assert m["codebook_usage"] == 10 / 16
  # Fixed batch shapes: the last batch is padded, so the tokenizer compiles once.
  assert seen_shapes == [(2, 9, 16, 16, 3)] * 3
  np.testing.assert_array_equal(result.reconstructions, clips)
  p = result.protocol
  assert p["num_clips"] == 5 and p["lpips_frames"] == [0, 4, 8] and p["lpips_net"] == "vgg16"
  assert p["source"] == {"data": "test", "seed": 3} and p["fvd"] is True
  # The inputs' features are computed once and reused by later evaluations.
  evaluator(reconstruct)
  # (5 inputs once; each evaluation's 6 = 5 reconstructions + the padding clip.)
  assert fake.clips_seen == 5 + 6 + 6


def test_evaluator_errors_name_the_keys():
  clips = np.zeros((2, 5, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match=r"config.protocol.fvd_num_frames.*config.input.num_frames"):
    recon.ReconstructionEvaluator(clips, {"fvd": True, "lpips": False}, codebook_size=4)
  with pytest.raises(ValueError, match=r"5 frames \(config.input.num_frames\).*"
                                       r"config.protocol.fvd_num_frames"):
    recon.ReconstructionEvaluator(clips, {"fvd": True, "fvd_num_frames": 9, "lpips": False},
                                  codebook_size=4)
  with pytest.raises(ValueError, match="config.protocol.lpips_net='alexnet' needs frames of "
                                       "at least 31x31"):
    recon.ReconstructionEvaluator(clips, {"fvd": False, "lpips_net": "alexnet"}, codebook_size=4)
  with pytest.raises(ValueError, match="unknown protocol key"):
    recon.ReconstructionEvaluator(clips, {"fvd_frames": 9}, codebook_size=4)


def test_evaluator_inside_a_trainer_mesh_with_replicated_weights():
  """As the trainer calls it: under its mesh, weights replicated over the mesh,
  a reconstruct_fn jitted with batch shardings. Placements must not clash."""
  import jax
  from phenaki_jax import sharding
  mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])  # a batch of 2 clips splits
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  clips = np.random.default_rng(0).integers(0, 256, (2, 9, 16, 16, 3), dtype=np.uint8)
  with sharding.use_mesh(mesh, [["act_batch", ["data", "fsdp"]]]):
    i3d = jax.device_put(perceptual.i3d_variables(), replicated)
    lpips = jax.device_put(perceptual.lpips_params("vgg16"), replicated)
    reconstruct = jax.jit(lambda x: (x * 0.5, (x[:, :, :2, :2, 0] > 0).astype(np.int32)),
                          in_shardings=batch_sharded, out_shardings=(replicated, replicated))
    evaluator = recon.ReconstructionEvaluator(
        clips, {"batch_size": 2, "fvd": True, "lpips_net": "vgg16"}, codebook_size=2,
        i3d_variables=i3d, lpips_params=lpips)
    result = evaluator(reconstruct)
  assert set(result.metrics) == {"psnr", "ssim", "lpips", "rfvd", "codebook_usage",
                                 "codebook_perplexity", "tokens_per_clip"}
  assert all(np.isfinite(v) for v in result.metrics.values())
  assert result.metrics["rfvd"] > 0 and result.metrics["lpips"] > 0
  assert result.token_grid == (9, 2, 2)


def _cheap_i3d(variables, clips, *, endpoint, resolution):
  """Stands in for I3D in placement tests: per-clip logits from a fixed projection."""
  del endpoint, resolution
  return jnp.tanh(clips.reshape(clips.shape[0], -1) @ variables["w"])


def _cheap_lpips(params, a, b, *, net):
  """Stands in for LPIPS in placement tests: a weighted mean absolute difference per image."""
  del net
  return jnp.mean(jnp.abs(a - b) * params["weights"], axis=(1, 2, 3))


def test_the_same_figures_on_meshes_of_8_2_and_1_devices(monkeypatch):
  """One global batch split over the mesh, results replicated: the metrics
  (and the reconstructions, codes and I3D statistics behind them) are the
  same whatever the number of devices, and whichever mesh axes the rules
  put the batch on. I3D and LPIPS are cheap stand-ins with weights of their
  own (their placement is under test, not their numerics, which compile for
  tens of seconds per mesh; the trainer-mesh test above runs the real ones
  on a mesh, tests/integration/multiprocess_test.py on several processes)."""
  import jax
  from phenaki_jax import sharding
  from phenaki_jax.config import rules as rules_lib
  monkeypatch.setattr(perceptual, "i3d_features", _cheap_i3d)
  monkeypatch.setattr(perceptual, "lpips_distance", _cheap_lpips)
  rng = np.random.default_rng(0)
  clips = rng.integers(0, 256, (10, 9, 16, 16, 3), dtype=np.uint8)  # 2 batches, the last padded
  i3d = {"w": (rng.normal(size=(9 * 16 * 16 * 3, 400)) / 50).astype(np.float32)}
  lpips = {"weights": rng.uniform(size=(3,)).astype(np.float32)}

  @jax.jit
  def reconstruct(x):
    codes = (x[:, ::4, ::8, ::8, 0] > 0).astype(jnp.int32)
    return jnp.clip(0.8 * x + 0.1 * jnp.sin(7 * x), -1, 1), codes

  protocol = {"batch_size": 8, "fvd": True, "lpips_net": "vgg16", "lpips_frames_per_clip": 3}
  tokenizer_rules = rules_lib.as_lists(rules_lib.TOKENIZER_RULES)
  layouts = {"8 devices": (recon.placement_lib.default_mesh(8, "protocol.batch_size"), None),
             "4 batch ways x 2 tensor": (sharding.make_mesh((1, 4, 2)), tokenizer_rules),
             "2 devices": (sharding.make_mesh((-1, 1, 1), jax.devices()[:2]), None),
             "1 device": (sharding.make_mesh((-1, 1, 1), jax.devices()[:1]), None)}
  results = {}
  for name, (mesh, rules) in layouts.items():
    evaluator = recon.ReconstructionEvaluator(clips, protocol, codebook_size=2, mesh=mesh,
                                              rules=rules, i3d_variables=i3d,
                                              lpips_params=lpips)
    assert evaluator.placement.num_devices == mesh.devices.size
    results[name] = evaluator(reconstruct)
  want = results["1 device"]
  assert set(want.metrics) == {"psnr", "ssim", "lpips", "rfvd", "codebook_usage",
                               "codebook_perplexity", "tokens_per_clip"}
  assert want.metrics["rfvd"] > 0 and want.metrics["lpips"] > 0
  assert want.reconstructions.shape == clips.shape
  for name, got in results.items():
    for k, v in want.metrics.items():
      assert got.metrics[k] == pytest.approx(v, rel=1e-5), (name, k)
    np.testing.assert_array_equal(got.reconstructions, want.reconstructions, err_msg=name)


def test_a_batch_the_mesh_cannot_split_is_refused_naming_the_key():
  from phenaki_jax import sharding
  clips = np.zeros((2, 5, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match=r"config.eval_protocol.batch_size=2: must be a positive "
                                       r"multiple of the 8 ways .*config.mesh.shape"):
    recon.ReconstructionEvaluator(clips, {"batch_size": 2, "fvd": False, "lpips": False},
                                  codebook_size=4, mesh=sharding.make_mesh((-1, 1, 1)),
                                  config_prefix="eval_protocol.")
