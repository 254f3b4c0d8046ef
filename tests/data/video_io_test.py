"""Tests for phenaki_jax.data.video_io on real and synthetic media."""

import os
import pickle

import av
import imageio_ffmpeg
import numpy as np
from PIL import Image
import pytest

from phenaki_jax.data import video_io

MEDIA = os.path.join(os.path.dirname(__file__), "media")
BAD = os.path.join(MEDIA, "bad")


def _media(*parts):
  return os.path.join(MEDIA, *parts)


def _index_video(path, num_frames, fps, size=(32, 48)):
  """Writes frames whose grey level is 3 * index: the level names the frame."""
  assert num_frames <= 85
  frames = np.zeros((num_frames,) + size + (3,), np.uint8)
  frames += (3 * np.arange(num_frames, dtype=np.uint8))[:, None, None, None]
  video_io.write_video(path, frames, fps, crf=0)
  return path


def _frame_index(frame):
  return int(round(frame.mean() / 3))


def _ffmpeg_first_frame(path):
  """First frame as the ffmpeg CLI shows it (it auto-rotates)."""
  gen = imageio_ffmpeg.read_frames(path)
  try:
    meta = next(gen)
    width, height = meta["size"]
    return np.frombuffer(next(gen), np.uint8).reshape(height, width, 3)
  finally:
    gen.close()


# ---------------------------------------------------------------- colours


def _rgb_bars(num_frames=4, height=32, width=48):
  frames = np.zeros((num_frames, height, width, 3), np.uint8)
  third = width // 3
  frames[:, :, :third, 0] = 255
  frames[:, :, third:2 * third, 1] = 255
  frames[:, :, 2 * third:, 2] = 255
  return frames


def _assert_rgb_bars(frame):
  h, w, _ = frame.shape
  third = w // 3
  centres = [frame[h // 2, third // 2], frame[h // 2, w // 2],
             frame[h // 2, w - third // 2]]
  for channel, pixel in enumerate(centres):
    assert pixel[channel] > 200, (channel, pixel)
    others = np.delete(pixel, channel)
    assert (others < 60).all(), (channel, pixel)


def test_mp4_round_trip_is_rgb_not_bgr(tmp_path):
  path = str(tmp_path / "bars.mp4")
  video_io.write_video(path, _rgb_bars(), fps=8)
  frames = video_io.read_video(path, fps=None)
  assert frames.dtype == np.uint8 and frames.shape == (4, 32, 48, 3)
  for frame in frames:
    _assert_rgb_bars(frame)


def test_gif_round_trip_is_rgb_not_bgr(tmp_path):
  path = str(tmp_path / "bars.gif")
  bars = _rgb_bars()
  bars[1::2] = bars[1::2, :, ::-1][:, :, ::-1]  # keep frames distinct
  bars[1, 0, 0] = 7
  video_io.write_gif(path, bars, fps=8)
  frames = video_io.read_video(path, fps=None)
  assert frames.shape[1:] == (32, 48, 3)
  _assert_rgb_bars(frames[0])


def test_write_video_pads_odd_sizes_and_takes_floats(tmp_path):
  path = str(tmp_path / "odd.mp4")
  frames = np.full((3, 15, 21, 3), 0.5, np.float32)
  video_io.write_video(path, frames, fps=8)
  back = video_io.read_video(path, fps=None)
  assert back.shape == (3, 16, 22, 3)
  assert abs(float(back.mean()) - 128) < 3


def test_grey_pixel_format_comes_out_three_channels(tmp_path):
  path = str(tmp_path / "grey.mkv")
  with av.open(path, "w") as out:
    stream = out.add_stream("ffv1", rate=8)
    stream.width, stream.height, stream.pix_fmt = 32, 24, "gray"
    for level in (0, 60, 120, 250):
      frame = np.full((24, 32), level, np.uint8)
      out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
    out.mux(stream.encode())
  assert video_io.probe_video(path).pix_fmt == "gray"
  frames = video_io.read_video(path, fps=None)
  assert frames.shape == (4, 24, 32, 3)
  np.testing.assert_array_equal(frames[..., 0], frames[..., 1])
  np.testing.assert_array_equal(frames[..., 0], frames[..., 2])
  np.testing.assert_array_equal(frames[:, 0, 0, 0], [0, 60, 120, 250])


def test_grey_real_video_has_equal_channels():
  frames = video_io.read_video(_media("videos", "film_countdown_2s.mp4"),
                               resolution=32)
  assert frames.shape[-1] == 3
  spread = np.abs(frames.astype(int) - frames.mean(-1, keepdims=True)).mean()
  assert spread < 3


# --------------------------------------------------------------- rotation


def test_rotated_real_file_comes_out_upright():
  path = os.path.join(BAD, "rotated_90.mov")
  info = video_io.probe_video(path)
  assert (info.coded_height, info.coded_width) == (320, 568)
  assert info.rotation == 270  # the file says: turn 90 degrees clockwise
  assert info.display_size == (568, 320)
  frames = video_io.read_video(path, fps=None)
  assert frames.shape == (3, 568, 320, 3)  # portrait: height/width swapped
  # Same picture as the ffmpeg command line tool, which auto-rotates.
  reference = _ffmpeg_first_frame(path)
  assert reference.shape == frames[0].shape
  assert np.abs(reference.astype(int) - frames[0]).mean() < 2


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_display_rotation_applied(tmp_path, degrees):
  frames = np.zeros((2, 32, 48, 3), np.uint8)
  frames[:, :16, :16] = (255, 0, 0)  # red top-left corner, as coded
  path = str(tmp_path / f"rot{degrees}.mp4")
  with av.open(path, "w") as out:
    stream = out.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
    stream.set_display_rotation(degrees)  # counter-clockwise
    for f in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    out.mux(stream.encode())
  got = video_io.read_video(path, fps=None)[0]
  expected = np.rot90(frames[0], k=degrees // 90)
  assert got.shape == expected.shape
  red = (got[..., 0] > 128) & (got[..., 1] < 100)
  np.testing.assert_array_equal(red, expected[..., 0] > 128)
  assert np.abs(_ffmpeg_first_frame(path).astype(int) - got).mean() < 2
  # Resizing keeps the upright orientation.
  small = video_io.read_video(path, fps=None, resolution=(8, 12))
  assert small.shape == (2, 8, 12, 3)


# ------------------------------------------------------------- timestamps


def test_unordered_timestamps():
  path = os.path.join(BAD, "unordered_timestamps.mov")
  pairs = list(video_io.iter_video_frames(path, fps=None))
  times = [t for t, _ in pairs]
  assert len(pairs) == 4
  np.testing.assert_allclose(times, np.arange(4) / 32)
  assert pairs[0][1].shape == (50, 50, 3)


def test_avi_timestamps_sorted_frames_in_decode_order():
  # Its decoder output carries pts like 1,2,4,3,5,7,6...: the frames are in
  # display order, the labels are not.
  path = _media("videos", "eye_makeup.avi")
  pairs = list(video_io.iter_video_frames(path, fps=None, resolution=32))
  times = np.array([t for t, _ in pairs])
  assert len(pairs) == 164
  np.testing.assert_allclose(times, np.arange(164) / 25)
  frames = np.stack([f for _, f in pairs]).astype(np.float32)
  in_order = np.abs(np.diff(frames, axis=0)).mean()
  swapped = frames.copy()
  swapped[2::3], swapped[3::3] = frames[3::3][:len(frames[2::3])], frames[2::3][
      :len(frames[3::3])]
  assert in_order < np.abs(np.diff(swapped, axis=0)).mean()


# -------------------------------------------------------------- resampling


@pytest.mark.parametrize("fps,expected", [
    (8.0, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]),
    (12.0, list(range(0, 30, 2))),
    (48.0, [i // 2 for i in range(60)]),
    (None, list(range(30))),
])
def test_fps_resampling_by_timestamp(tmp_path, fps, expected):
  path = _index_video(str(tmp_path / "index.mp4"), num_frames=30, fps=24)
  frames = video_io.read_video(path, fps=fps)
  assert [_frame_index(f) for f in frames] == expected


@pytest.mark.parametrize("name,count", [
    ("arm_wrestling_2s.mp4", 16),  # 2.0 s at 8 fps
    ("eye_makeup.avi", 53),  # 6.56 s
    ("film_countdown_2s.mp4", 21),  # 2.5025 s
])
def test_fps_resampling_real_counts(name, count):
  frames = video_io.read_video(_media("videos", name), fps=8, resolution=16)
  assert frames.shape == (count, 16, 16, 3)


# ---------------------------------------------------------------- clips


@pytest.mark.parametrize("num_frames,stride,max_clips,starts", [
    (5, None, 0, [0, 5, 10, 15]),  # 24 frames, back to back
    (5, 2, 0, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]),  # overlapping
    (5, 8, 0, [0, 8, 16]),  # gaps
    (5, None, 2, [0, 5]),
    (24, None, 0, [0]),
])
def test_clip_cutting_and_stride(tmp_path, num_frames, stride, max_clips,
                                 starts):
  path = _index_video(str(tmp_path / "index.mp4"), num_frames=72, fps=24)
  clips = video_io.read_clips(path, num_frames=num_frames, stride=stride,
                              max_clips=max_clips, fps=8)
  assert [round(c.start_time * 8) for c in clips] == starts
  for clip, start in zip(clips, starts):
    assert clip.frames.shape == (num_frames, 32, 48, 3)
    # Frame k of a clip is resampled frame start + k = source frame 3*(...).
    assert [_frame_index(f) for f in clip.frames] == [
        3 * (start + k) for k in range(num_frames)]


def test_too_short_for_one_clip(tmp_path):
  path = _index_video(str(tmp_path / "short.mp4"), num_frames=30, fps=24)
  with pytest.raises(video_io.VideoDecodeError) as err:
    video_io.read_clips(path, num_frames=11, fps=8)
  assert err.value.kind == video_io.TOO_SHORT
  assert "short.mp4" in str(err.value) and "10 frames" in str(err.value)


# --------------------------------------------------------- resize / crop


def test_resize_on_short_side_and_centre_crop(tmp_path):
  frames = np.zeros((2, 32, 64, 3), np.uint8)
  frames[..., 2] = 255  # blue sides ...
  frames[:, :, 16:48] = (255, 0, 0)  # ... around a red 32x32 centre
  path = str(tmp_path / "wide.mp4")
  video_io.write_video(path, frames, fps=8, crf=0)
  out = video_io.read_video(path, fps=None, resolution=16)
  assert out.shape == (2, 16, 16, 3)
  inner = out[:, 1:-1, 1:-1].astype(int)  # edge pixels mix in chroma blur
  assert (inner[..., 0] > 200).all() and (inner[..., 2] < 60).all()


def test_resize_antialiases():
  checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
  out = video_io.resize_and_crop(np.stack([checker] * 3, -1), 8)
  assert np.abs(out.astype(int) - 127.5).max() < 10  # averaged, not aliased


# ---------------------------------------------------------------- images


def test_read_image_colour_grey_and_jpeg():
  rgb = video_io.read_image(_media("images", "chelsea.png"), resolution=32)
  assert rgb.shape == (1, 32, 32, 3) and rgb.dtype == np.uint8
  grey = video_io.read_image(_media("images", "camera.png"))
  assert grey.shape == (1, 64, 64, 3)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  jpeg = video_io.read_image(_media("images", "rocket.jpg"), resolution=16,
                             num_frames=3)
  assert jpeg.shape == (3, 16, 16, 3)
  np.testing.assert_array_equal(jpeg[0], jpeg[2])


def test_read_image_alpha_16bit_and_exif(tmp_path):
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[:4, ..., 3] = 255  # top half opaque red, bottom transparent
  Image.fromarray(rgba).save(tmp_path / "a.png")
  out = video_io.read_image(str(tmp_path / "a.png"))[0]
  np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
  np.testing.assert_array_equal(out[7, 7], (255, 255, 255))

  deep = np.full((4, 4), 65535, np.uint16)
  Image.fromarray(deep).save(tmp_path / "d.png")
  assert video_io.read_image(str(tmp_path / "d.png")).min() == 255

  image = Image.new("RGB", (20, 10), (0, 0, 255))
  exif = image.getexif()
  exif[0x0112] = 6  # orientation: rotate 90 clockwise to view
  image.save(tmp_path / "e.jpg", exif=exif)
  assert video_io.read_image(str(tmp_path / "e.jpg")).shape == (1, 20, 10, 3)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("name,kind,words", [
    ("corrupted.mp4", video_io.CORRUPTED, "corrupted"),
    ("truncated.mp4", video_io.TRUNCATED, "moov"),
    ("empty.mp4", video_io.EMPTY, "empty"),
    ("not_a_video.mp4", video_io.NOT_A_VIDEO, "not a video"),
    ("missing_file.mp4", video_io.MISSING, "not found"),
])
def test_bad_files_raise_naming_file_and_reason(name, kind, words):
  with pytest.raises(video_io.VideoDecodeError) as err:
    video_io.read_video(os.path.join(BAD, name), resolution=16)
  assert err.value.kind == kind
  assert name in str(err.value) and words in str(err.value)


def test_truncated_after_index_is_reported(tmp_path):
  path = str(tmp_path / "whole.mp4")
  frames = np.random.default_rng(0).integers(0, 255, (48, 32, 32, 3), np.uint8)
  with av.open(path, "w", options={"movflags": "faststart"}) as out:
    stream = out.add_stream("libx264", rate=24)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for f in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    out.mux(stream.encode())
  with open(path, "rb") as f:
    data = f.read()
  cut = str(tmp_path / "cut.mp4")
  with open(cut, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(video_io.VideoDecodeError) as err:
    video_io.read_video(cut)
  assert err.value.kind == video_io.TRUNCATED and "cut.mp4" in str(err.value)


def test_bad_images(tmp_path):
  (tmp_path / "text.png").write_text("hello")
  with pytest.raises(video_io.VideoDecodeError) as err:
    video_io.read_image(str(tmp_path / "text.png"))
  assert err.value.kind == video_io.BAD_IMAGE and "text.png" in str(err.value)
  with pytest.raises(video_io.VideoDecodeError) as err:
    video_io.read_image(str(tmp_path / "nope.jpg"))
  assert err.value.kind == video_io.MISSING


def test_error_survives_pickling():
  err = video_io.VideoDecodeError("/x/y.mp4", video_io.EMPTY, "empty file")
  back = pickle.loads(pickle.dumps(err))
  assert (back.path, back.kind, str(back)) == (err.path, err.kind, str(err))


def test_is_image_path():
  assert video_io.is_image_path("a/B.JPEG")
  assert not video_io.is_image_path("a/b.mp4")
