"""Tests for the synthetic shapes dataset (phenaki_jax.data.synthetic)."""

import collections
import itertools
import pickle
import re
import time

import grain
import numpy as np
import pytest

from phenaki_jax.data import synthetic as syn

RES = 64
T = 11
SPEED = 0.05 * RES  # Half the frame over 10 steps.
DIRS = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1),
        "moves down": (0, 1), "stays still": (0, 0)}


def _alpha(frames: np.ndarray) -> np.ndarray:
  """[T, H, W] object coverage; lit channels of a pixel are all equal."""
  return frames.max(axis=-1).astype(np.float64) / 255.0


def _centroids(frames: np.ndarray) -> np.ndarray:
  """[T, 2] coverage-weighted (x, y) centroid in pixels."""
  a = _alpha(frames)
  grid = np.arange(frames.shape[1]) + 0.5
  mass = a.sum(axis=(1, 2))
  x = (a * grid[None, None, :]).sum(axis=(1, 2)) / mass
  y = (a * grid[None, :, None]).sum(axis=(1, 2)) / mass
  return np.stack([x, y], axis=-1)


def _bbox_size(frame: np.ndarray) -> tuple[int, int]:
  """(width, height) of pixels at least half covered."""
  ys, xs = np.nonzero(_alpha(frame[None])[0] >= 0.5)
  return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


@pytest.fixture(scope="module")
def video_items():
  src = syn.ShapesVideoSource(num_frames=T, resolution=RES, seed=0)
  return [src[i] for i in range(150)]


def test_deterministic_by_seed_and_index():
  a = syn.ShapesVideoSource(T, RES, seed=3)
  b = syn.ShapesVideoSource(T, RES, seed=3)
  c = syn.ShapesVideoSource(T, RES, seed=4)
  for i in (0, 1, 17, 999_999):
    np.testing.assert_array_equal(a[i]["frames"], b[i]["frames"])
    assert a[i]["caption"] == b[i]["caption"]
    assert not np.array_equal(a[i]["frames"], c[i]["frames"])
  # Access order must not matter: no shared stateful RNG.
  first = a[5]["frames"]
  _ = [a[j] for j in (9, 2, 7)]
  np.testing.assert_array_equal(a[5]["frames"], first)
  # Different indices give different clips.
  clips = [a[i]["frames"].tobytes() for i in range(30)]
  assert len(set(clips)) == 30

  img_a, img_b = syn.ShapesImageSource(RES, seed=3), syn.ShapesImageSource(
      RES, seed=3)
  img_c = syn.ShapesImageSource(RES, seed=4)
  np.testing.assert_array_equal(img_a[8]["frames"], img_b[8]["frames"])
  assert not np.array_equal(img_a[8]["frames"], img_c[8]["frames"])


@pytest.mark.parametrize("num_frames,res", [(1, 16), (3, 32), (11, 64),
                                            (21, 48)])
def test_shapes_and_dtype(num_frames, res):
  item = syn.ShapesVideoSource(num_frames, res)[0]
  assert set(item) == {"frames", "caption"}
  assert item["frames"].shape == (num_frames, res, res, 3)
  assert item["frames"].dtype == np.uint8
  assert isinstance(item["caption"], str)
  img = syn.ShapesImageSource(res)[0]
  assert img["frames"].shape == (1, res, res, 3)
  assert img["frames"].dtype == np.uint8


def test_len_index_errors_and_repr():
  src = syn.ShapesVideoSource(T, RES, seed=2, num_records=5)
  assert len(src) == 5
  np.testing.assert_array_equal(src[-1]["frames"], src[4]["frames"])
  for bad in (5, -6, 100):
    with pytest.raises(IndexError):
      _ = src[bad]
  with pytest.raises(IndexError):
    _ = syn.ShapesImageSource(RES, num_records=3)[3]
  r = repr(src)
  assert "ShapesVideoSource" in r
  for part in ("num_frames=11", "resolution=64", "seed=2", "num_records=5"):
    assert part in r
  assert "ShapesImageSource" in repr(syn.ShapesImageSource(RES))


def test_constants():
  assert syn.SHAPES == ("circle", "square", "triangle")
  assert syn.COLOURS == {
      "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
      "yellow": (255, 255, 0), "magenta": (255, 0, 255),
      "cyan": (0, 255, 255), "white": (255, 255, 255)}
  assert syn.SIZES == ("small", "large")
  assert set(syn.MOTIONS) == set(DIRS)


def test_caption_grammar_and_parse_inverts_all_combinations():
  video_re = re.compile(r"^a (small|large) (\w+) (circle|square|triangle) "
                        r"(moves (left|right|up|down)|stays still)$")
  combos = itertools.product(syn.SHAPES, syn.COLOURS, syn.SIZES, syn.MOTIONS)
  seen = set()
  for shape, colour, size, motion in combos:
    spec = syn.ShapesSpec(shape=shape, colour=colour, size=size,
                          motion=motion, start=(0.5, 0.5))
    cap = syn.caption_for(spec, still_image=False)
    assert cap == f"a {size} {colour} {shape} {motion}"
    assert video_re.match(cap)
    assert syn.parse_caption(cap) == {
        "size": size, "colour": colour, "shape": shape, "motion": motion}
    img_cap = syn.caption_for(spec, still_image=True)
    assert img_cap == f"a {size} {colour} {shape}"
    assert syn.parse_caption(img_cap) == {
        "size": size, "colour": colour, "shape": shape, "motion": None}
    seen.add(cap)
  assert len(seen) == 3 * 7 * 2 * 5
  assert syn.parse_caption("the blue square moves down") == {
      "size": None, "colour": "blue", "shape": "square",
      "motion": "moves down"}
  for bad in ("a huge red circle", "a small red hexagon moves left",
              "a small red circle moves sideways", "small red circle", ""):
    with pytest.raises(ValueError):
      syn.parse_caption(bad)


def test_spec_rejects_unknown_values():
  with pytest.raises(ValueError):
    syn.ShapesSpec("hexagon", "red", "small", "moves left", (0.5, 0.5))
  with pytest.raises(ValueError):
    syn.ShapesSpec("circle", "orange", "small", "moves left", (0.5, 0.5))


def test_object_has_exact_caption_colour(video_items):
  images = [syn.ShapesImageSource(RES, seed=1)[i] for i in range(40)]
  for item in video_items + images:
    rgb = np.array(syn.COLOURS[syn.parse_caption(item["caption"])["colour"]])
    frames = item["frames"].reshape(-1, 3).astype(int)
    exact = np.all(frames == rgb, axis=-1)
    assert exact.sum() > 0
    lit = frames.max(axis=-1) > 0
    # Edge pixels may be dimmed by anti-aliasing, but only along the colour:
    # off channels stay 0 and lit channels stay equal.
    on = rgb > 0
    assert np.all(frames[:, ~on] == 0)
    assert np.all(frames[lit][:, on] == frames[lit][:, on][:, :1])
    # Much of the object is interior, i.e. exactly the colour (a small
    # triangle is about half fringe).
    assert exact.sum() >= 0.4 * lit.sum()


@pytest.mark.parametrize("shape", syn.SHAPES)
def test_object_size(shape):
  widths = {}
  for size in syn.SIZES:
    spec = syn.ShapesSpec(shape, "white", size, "stays still", (0.5, 0.5))
    w, h = _bbox_size(syn.render_clip(spec, 1, RES)[0])
    expected = syn.SIZE_FRACTION[size] * RES
    # A triangle's apex is under half a pixel wide for its last pixel rows.
    assert abs(w - expected) <= 2, (size, w, expected)
    assert abs(h - expected) <= 2, (size, h, expected)
    widths[size] = w
  assert widths["large"] / widths["small"] == pytest.approx(5 / 3, rel=0.12)
  assert syn.SIZE_FRACTION == {"small": 1 / 5, "large": 1 / 3}


def test_motion_direction_speed_and_still(video_items):
  by_motion = collections.defaultdict(int)
  for item in video_items:
    motion = syn.parse_caption(item["caption"])["motion"]
    by_motion[motion] += 1
    c = _centroids(item["frames"])
    steps = np.diff(c, axis=0)
    d = np.array(DIRS[motion], float)
    if motion == "stays still":
      assert np.all(item["frames"] == item["frames"][:1])
      continue
    # First half (frames 0..5): every step is a full step in the captioned
    # direction, so the caption holds without a bounce.
    np.testing.assert_allclose(steps[:5], np.tile(d * SPEED, (5, 1)), atol=0.1)
    np.testing.assert_allclose(c[5] - c[0], d * RES / 4, atol=0.5)
    # Over the whole clip it travels about half the frame; a bounce inside a
    # step shortens that step by at most one step.
    path = np.linalg.norm(steps, axis=-1).sum()
    assert RES / 2 - SPEED - 0.5 <= path <= RES / 2 + 0.5, path
    # Never moves off its axis.
    np.testing.assert_allclose(steps @ (1 - np.abs(d)), 0, atol=0.1)
  assert min(by_motion.values()) >= 15  # Every motion was exercised.


def test_bounces_off_border():
  # Starts 2 steps short of the right border: moves right, then back left.
  r = syn.object_radius("small", RES) + 0.5
  x0 = (RES - r - 2.5 * SPEED) / RES
  spec = syn.ShapesSpec("square", "red", "small", "moves right", (x0, 0.5))
  c = _centroids(syn.render_clip(spec, T, RES))
  steps = np.diff(c[:, 0])
  assert np.all(steps[:2] > 0) and np.all(steps[3:] < 0)
  assert c[-1, 0] < c[2, 0]


def test_object_stays_fully_inside_frame(video_items):
  ref_mass = {}
  for shape, size in itertools.product(syn.SHAPES, syn.SIZES):
    spec = syn.ShapesSpec(shape, "white", size, "stays still", (0.5, 0.5))
    ref_mass[shape, size] = _alpha(syn.render_clip(spec, 1, RES)).sum()
  for item in video_items:
    cap = syn.parse_caption(item["caption"])
    mass = _alpha(item["frames"]).sum(axis=(1, 2))
    # A clipped object would lose area in that frame.
    np.testing.assert_allclose(mass, ref_mass[cap["shape"], cap["size"]],
                               rtol=0.03)
  # Even a spec pinned to a corner renders unclipped.
  spec = syn.ShapesSpec("circle", "white", "large", "moves down", (1.0, 1.0))
  mass = _alpha(syn.render_clip(spec, T, RES)).sum(axis=(1, 2))
  np.testing.assert_allclose(mass, ref_mass["circle", "large"], rtol=0.03)


def test_all_combinations_appear_roughly_uniformly():
  src = syn.ShapesVideoSource(num_frames=2, resolution=16, seed=0)
  n = 4200  # 20 per combination on average.
  counts = collections.Counter(src[i]["caption"] for i in range(n))
  assert len(counts) == 3 * 7 * 2 * 5
  assert min(counts.values()) >= 5 and max(counts.values()) <= 45
  imgs = syn.ShapesImageSource(resolution=16, seed=0)
  img_counts = collections.Counter(imgs[i]["caption"] for i in range(840))
  assert len(img_counts) == 3 * 7 * 2
  assert all(syn.parse_caption(c)["motion"] is None for c in img_counts)


def test_sample_spec_is_a_function_of_the_rng():
  a = syn.sample_spec(np.random.default_rng(7), RES, T, still_image=False)
  b = syn.sample_spec(np.random.default_rng(7), RES, T, still_image=False)
  assert a == b
  img = syn.sample_spec(np.random.default_rng(7), RES, T, still_image=True)
  assert img.motion == "stays still"
  assert syn.caption_for(img, still_image=True).count(" ") == 3


def test_story():
  motions = ["moves right", "moves left", "moves down"]
  frames, caps, starts = syn.render_story(
      motions, 6, RES, seed=5, shape="square", colour="blue", size="large")
  assert frames.shape == (18, RES, RES, 3) and frames.dtype == np.uint8
  assert starts == [0, 6, 12]
  assert caps == ["a large blue square moves right",
                  "the blue square moves left", "the blue square moves down"]
  assert np.all(np.all(frames == (0, 0, 255), axis=-1).sum(axis=(1, 2)) > 0)
  c = _centroids(frames)
  steps = np.diff(c, axis=0)  # steps[t - 1] leads into frame t.
  # Each segment's first steps follow its caption, starting right at the
  # boundary frame.
  for s, m in zip(starts, motions):
    for t in range(max(s, 1), s + 3):
      np.testing.assert_allclose(steps[t - 1], np.array(DIRS[m]) * SPEED,
                                 atol=0.1)
  # Continuity: no frame-to-frame jump larger than one step, anywhere.
  assert np.linalg.norm(steps, axis=-1).max() <= SPEED + 0.1

  # Unequal lengths, random shape/colour, and a repeated motion after a
  # bounce: 20 steps right cross the frame, so the object is heading left by
  # frame 20, yet the second "moves right" segment starts by moving right.
  for seed in range(3):
    frames, caps, starts = syn.render_story(
        ["moves right", "moves right", "stays still"], [21, 4, 3], RES,
        seed=seed, size="large")
    assert frames.shape[0] == 28 and starts == [0, 21, 25]
    first = syn.parse_caption(caps[0])
    assert first["size"] == "large" and first["motion"] == "moves right"
    later = syn.parse_caption(caps[1])
    assert later["size"] is None
    assert (later["colour"], later["shape"]) == (
        first["colour"], first["shape"])
    c = _centroids(frames)
    assert c[20, 0] < c[19, 0]  # Bounced off the right border.
    np.testing.assert_allclose(np.diff(c[20:25, 0]), SPEED, atol=0.1)
    np.testing.assert_allclose(c[25:], np.tile(c[24], (3, 1)), atol=1e-6)
  with pytest.raises(ValueError):
    syn.render_story(["moves left"], [3, 4], RES)
  with pytest.raises(ValueError):
    syn.render_story(["jumps"], 3, RES)


def test_pickle_round_trip():
  for src in (syn.ShapesVideoSource(T, 32, seed=9, num_records=10),
              syn.ShapesImageSource(32, seed=9, num_records=10)):
    clone = pickle.loads(pickle.dumps(src))
    assert repr(clone) == repr(src) and len(clone) == len(src)
    np.testing.assert_array_equal(clone[3]["frames"], src[3]["frames"])
    assert clone[3]["caption"] == src[3]["caption"]
  spec = syn.ShapesVideoSource(T, 32).spec(0)
  assert pickle.loads(pickle.dumps(spec)) == spec


def test_grain_map_dataset():
  src = syn.ShapesVideoSource(num_frames=3, resolution=16, num_records=10)
  assert isinstance(src, grain.sources.RandomAccessDataSource)
  ds = grain.MapDataset.source(src)
  assert len(ds) == 10
  np.testing.assert_array_equal(ds[4]["frames"], src[4]["frames"])
  batch = next(iter(ds.shuffle(seed=0).batch(4).to_iter_dataset()))
  assert batch["frames"].shape == (4, 3, 16, 16, 3)
  assert len(batch["caption"]) == 4


def test_render_is_fast():
  spec = syn.ShapesSpec("circle", "red", "large", "moves left", (0.6, 0.5))
  times = []
  for _ in range(20):
    t0 = time.perf_counter()
    syn.render_clip(spec, T, RES)
    times.append(time.perf_counter() - t0)
  assert min(times) < 0.01
