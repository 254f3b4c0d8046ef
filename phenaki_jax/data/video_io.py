"""Decoding and encoding of videos and images for the data path.

Videos are decoded with PyAV (its bundled FFmpeg) and come out as RGB uint8
arrays `[T, H, W, 3]` whatever the source pixel format (grey, 4:2:0, paletted
GIF, 10-bit...), upright (display-matrix rotation is applied), resampled to a
target frame rate by timestamp, and optionally resized on the short side and
centre-cropped. Images are read with PIL (EXIF orientation applied) as
1-frame clips.

Timestamps: a decoder hands frames out in display order, but some containers
label them with timestamps that are not monotonic (AVI with B-frames, the
`unordered_timestamps.mov` test file). We sort the *timestamps* and pair the
k-th decoded frame with the k-th smallest one. Sorting the frames by their own
pts instead scrambles such files: on `eye_makeup.avi` (UCF-101) the mean
absolute difference between consecutive frames is 2.5 in decode order and 4.0
after a pts sort, i.e. the pts order is the wrong one.

Every failure is raised as `VideoDecodeError`, whose message names the file and
what is wrong, and whose `kind` is a short machine-readable reason.

Paths may be local or `gs://` (phenaki_jax/storage.py). A remote video is
downloaded whole to a local temporary file and decoded there by FFmpeg's own
file reader: decoding a clip reads the whole file anyway, one whole-object
download is the cheapest way to fetch it, and the broken-file diagnosis below
(MP4 box walk, text sniffing) runs on the same bytes either way. Messages name
the `gs://` path, never the temporary file. Images are read as bytes and
decoded by PIL from memory. Writers (`write_video`, `VideoWriter`,
`write_gif`) encode into a local temporary file moved or uploaded whole at the
end, so an output never exists half-written.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fractions
import heapq
import io
import os
import struct
from typing import Iterator, Sequence

import av
import numpy as np
from PIL import Image
from PIL import ImageOps

from phenaki_jax import storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Reasons carried by VideoDecodeError.kind.
MISSING = "missing"
EMPTY = "empty"
UNREADABLE = "unreadable"
NOT_A_VIDEO = "not_a_video"
TRUNCATED = "truncated"
CORRUPTED = "corrupted"
NO_VIDEO_STREAM = "no_video_stream"
NO_FRAMES = "no_frames"
TOO_SHORT = "too_short"
BAD_IMAGE = "bad_image"

# Frames held back to sort timestamps; AVI B-frame reordering needs only ~3.
_REORDER_WINDOW = 16
# Tolerance (seconds) when comparing resampling times with frame timestamps.
_TIME_EPS = 1e-6

Resolution = int | tuple[int, int] | None


class VideoDecodeError(Exception):
  """A video or image could not be used; the message names the file."""

  def __init__(self, path: str, kind: str, detail: str):
    self.path = str(path)
    self.kind = kind
    self.detail = detail
    super().__init__(f"{self.path}: {detail}")

  def __reduce__(self):
    # Custom __init__ args: needed to cross process boundaries intact.
    return (type(self), (self.path, self.kind, self.detail))


@dataclasses.dataclass(frozen=True)
class Clip:
  """A run of frames cut from one source."""
  frames: np.ndarray  # uint8 [T, H, W, 3]
  start_time: float  # seconds after the source's first frame


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """Container-level facts about a video's first video stream."""
  codec: str
  pix_fmt: str | None
  coded_width: int
  coded_height: int
  rotation: int  # degrees counter-clockwise to display upright
  fps: float | None
  duration: float | None  # seconds
  num_frames: int  # 0 when the container does not say

  @property
  def display_size(self) -> tuple[int, int]:
    """(height, width) once rotation is applied."""
    if self.rotation % 180:
      return self.coded_width, self.coded_height
    return self.coded_height, self.coded_width


def is_image_path(path: str) -> bool:
  """True for paths whose extension marks an image-text pair."""
  return storage.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _target_hw(resolution: Resolution) -> tuple[int, int] | None:
  if resolution is None:
    return None
  if isinstance(resolution, int):
    return resolution, resolution
  h, w = resolution
  return int(h), int(w)


def resize_and_crop(image: Image.Image | np.ndarray,
                    resolution: Resolution) -> np.ndarray:
  """Resizes so the image covers `resolution`, then centre-crops to it.

  Args:
    image: a PIL image or an `[H, W, 3]` uint8 array.
    resolution: an int for a square output, `(height, width)`, or None to
      keep the size.

  Returns:
    uint8 `[h, w, 3]`. Downscaling is antialiased (PIL bicubic widens its
    kernel with the scale factor).
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  target = _target_hw(resolution)
  if target is None:
    return np.asarray(image.convert("RGB"))
  h, w = target
  src_w, src_h = image.size
  scale = max(h / src_h, w / src_w)
  crop_w, crop_h = w / scale, h / scale
  left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
  # Cropping through `box` resamples only the kept region, in one pass.
  out = image.resize((w, h), Image.Resampling.BICUBIC,
                     box=(left, top, left + crop_w, top + crop_h))
  return np.asarray(out)


# ----------------------------------------------------------------------------
# Diagnosis of files FFmpeg refuses.


def _check_file(path: str) -> None:
  """Raises for files (or objects) that cannot be media at all."""
  try:
    if not storage.exists(path):
      raise VideoDecodeError(path, MISSING, "file not found")
    if not storage.isfile(path):
      raise VideoDecodeError(path, UNREADABLE, "not a regular file")
    if storage.size(path) == 0:
      raise VideoDecodeError(path, EMPTY, "empty file (0 bytes)")
    if not storage.is_remote(path):  # (an object's download reads it anyway)
      with storage.open_file(path, "rb") as f:
        f.read(1)
  except (OSError, storage.StorageError) as e:
    raise VideoDecodeError(path, UNREADABLE, f"cannot read file: {e}") from e


@contextlib.contextmanager
def _local_media(path: str) -> Iterator[str]:
  """A local file with the media's bytes: `path` itself, or a `gs://` object
  downloaded whole (see the module docstring); checked by `_check_file`."""
  _check_file(path)
  stack = contextlib.ExitStack()
  try:
    local = stack.enter_context(storage.local_copy(path))
  except (OSError, storage.StorageError) as e:
    raise VideoDecodeError(path, UNREADABLE, f"cannot read file: {e}") from e
  with stack:
    yield local


def _iso_boxes(path: str) -> tuple[list[tuple[str, int, int]], int] | None:
  """Top-level (name, offset, size) boxes of a (local) MP4/MOV file, else None."""
  size = storage.size(path)
  boxes = []
  with storage.open_file(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8 or head[4:8] not in (b"ftyp", b"moov", b"mdat", b"wide",
                                          b"free", b"skip"):
      return None
    offset = 0
    while offset + 8 <= size:
      f.seek(offset)
      header = f.read(16)
      box_size, box_type = struct.unpack(">I4s", header[:8])
      if box_size == 1 and len(header) >= 16:
        box_size = struct.unpack(">Q", header[8:16])[0]
      elif box_size == 0:  # runs to the end of the file
        box_size = size - offset
      boxes.append((box_type.decode("latin-1"), offset, box_size))
      if box_size < 8:
        break
      offset += box_size
  return boxes, size


def _iso_bmff_problem(path: str, *, opened: bool) -> str | None:
  """For MP4/MOV files: how the box structure is cut short, if it is.

  Args:
    path: the file.
    opened: FFmpeg opened the file; then only a media box running past the
      end counts (trailing junk after a complete file is harmless).
  """
  found = _iso_boxes(path)
  if found is None:
    return None
  boxes, size = found
  names = [name for name, _, _ in boxes]
  for name, offset, box_size in boxes:
    if box_size < 8 and not opened:
      return f"invalid MP4 box '{name}' at byte {offset}"
    if offset + box_size > size and (
        not opened or name in ("mdat", "moov", "moof")):
      return (f"truncated: MP4 box '{name}' at byte {offset} needs "
              f"{box_size} bytes but the file ends at byte {size}"
              + ("" if "moov" in names else "; no 'moov' index"))
  if "moov" not in names and not opened:
    return "truncated or incomplete MP4: no 'moov' index box"
  return None


def _looks_like_text(path: str) -> bool:
  with storage.open_file(path, "rb") as f:
    head = f.read(512)
  return bool(head) and all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def _open_failure(local: str, path: str, err: Exception) -> VideoDecodeError:
  problem = _iso_bmff_problem(local, opened=False)
  if problem:
    return VideoDecodeError(path, TRUNCATED, problem)
  if _looks_like_text(local):
    return VideoDecodeError(path, NOT_A_VIDEO,
                            "not a video: the file holds plain text")
  # FFmpeg's message names the file it opened: for a download, the temporary one.
  detail = str(err).replace(local, path)
  return VideoDecodeError(
      path, NOT_A_VIDEO, f"not a video: FFmpeg cannot open it ({detail})")


@contextlib.contextmanager
def _open(path: str) -> Iterator[av.container.InputContainer]:
  """The opened container of the video at `path` (local or remote)."""
  with _local_media(path) as local:
    try:
      container = av.open(local, metadata_errors="ignore")
    except av.error.FFmpegError as e:
      raise _open_failure(local, path, e) from e
    with container:
      # An MP4 cut after its index opens fine and may even decode without an
      # error, just shorter: catch it here.
      problem = _iso_bmff_problem(local, opened=True)
      if problem:
        raise VideoDecodeError(path, TRUNCATED, problem)
      yield container


def _video_stream(container, path: str):
  if not container.streams.video:
    raise VideoDecodeError(path, NO_VIDEO_STREAM,
                           "the file has no video stream")
  return container.streams.video[0]


def _stream_fps(stream) -> float | None:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate:
      return float(rate)
  return None


def probe_video(path: str) -> VideoInfo:
  """Reads container facts (and the first frame, for its rotation)."""
  path = os.fspath(path)
  with _open(path) as container:
    stream = _video_stream(container, path)
    duration = None
    if stream.duration is not None and stream.time_base is not None:
      duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
      duration = container.duration / av.time_base
    rotation = 0
    try:
      for frame in container.decode(stream):
        rotation = _rotation(frame)
        break
    except av.error.FFmpegError:
      pass  # Facts only; read_video reports the damage.
    ctx = stream.codec_context
    return VideoInfo(
        codec=ctx.name, pix_fmt=ctx.pix_fmt, coded_width=ctx.width,
        coded_height=ctx.height, rotation=rotation, fps=_stream_fps(stream),
        duration=duration, num_frames=stream.frames or 0)


# ----------------------------------------------------------------------------
# Decoding.


def _rotation(frame: av.VideoFrame) -> int:
  """Counter-clockwise degrees (multiple of 90) that make the frame upright."""
  # av 18 reads the frame's DISPLAYMATRIX side data into `rotation`; like
  # FFmpeg's autorotate we undo it, and only in quarter turns.
  angle = getattr(frame, "rotation", 0) or 0
  return int(round(angle / 90.0)) * 90 % 360


def _decoded(container, stream, path: str
             ) -> Iterator[tuple[float, av.VideoFrame]]:
  """Yields (seconds, frame) in decode order, with raw timestamps."""
  fps = _stream_fps(stream) or 25.0
  last = None
  count = 0
  try:
    for frame in container.decode(stream):
      t = frame.time
      if t is None:
        t = 0.0 if last is None else last + 1.0 / fps
      last = t
      count += 1
      yield t, frame
  except av.error.FFmpegError as e:
    where = f"after {_frames(count)}" + (f" (t={last:.2f}s)" if last else "")
    detail = str(e).replace(container.name, path) if container.name else str(e)
    raise VideoDecodeError(path, CORRUPTED,
                           f"corrupted stream: decoding failed {where}: {detail}"
                           ) from e


def _frames(n: int) -> str:
  return f"{n} frame" + ("" if n == 1 else "s")


def _sorted_times(timed: Iterator[tuple[float, av.VideoFrame]]
                  ) -> Iterator[tuple[float, av.VideoFrame]]:
  """Pairs each frame (kept in decode order) with the timestamps sorted."""
  heap: list[float] = []
  pending: collections.deque = collections.deque()
  for t, frame in timed:
    heapq.heappush(heap, t)
    pending.append(frame)
    if len(pending) > _REORDER_WINDOW:
      yield heapq.heappop(heap), pending.popleft()
  while pending:
    yield heapq.heappop(heap), pending.popleft()


def _resampled(timed: Iterator[tuple[float, av.VideoFrame]], fps: float,
               frame_duration: float | None
               ) -> Iterator[tuple[float, av.VideoFrame]]:
  """Samples frames at times t0 + k / fps, each showing the frame on screen."""
  prev_t = prev = t0 = None
  k = 0
  last_step = None
  for t, frame in timed:
    if prev is None:
      t0, prev_t, prev = t, t, frame
      continue
    while t0 + k / fps + _TIME_EPS < t:
      yield t0 + k / fps, prev
      k += 1
    if t > prev_t:
      last_step = t - prev_t
    prev_t, prev = t, frame
  if prev is None:
    return
  end = prev_t + (frame_duration or last_step or 1.0 / fps)
  while t0 + k / fps + _TIME_EPS < end:
    yield t0 + k / fps, prev
    k += 1


def iter_video_frames(path: str, *, fps: float | None = 8.0,
                      resolution: Resolution = None
                      ) -> Iterator[tuple[float, np.ndarray]]:
  """Streams `(time, frame)` pairs of a video, decoded to RGB uint8.

  Args:
    path: the video file.
    fps: output frame rate, sampled by timestamp (a frame is repeated or
      dropped as needed); None keeps every decoded frame.
    resolution: see `resize_and_crop`; None keeps the (upright) size.

  Yields:
    (seconds after the first frame, uint8 `[H, W, 3]` upright RGB frame).

  Raises:
    VideoDecodeError: the file is missing, empty, not a video, truncated,
      corrupted, or has no video stream or no frames.
  """
  path = os.fspath(path)
  with _open(path) as container:
    stream = _video_stream(container, path)
    stream.thread_type = "AUTO"
    src_fps = _stream_fps(stream)
    timed = _sorted_times(_decoded(container, stream, path))
    if fps:
      timed = _resampled(timed, float(fps), 1.0 / src_fps if src_fps else None)
    target = _target_hw(resolution)
    t0 = None
    cached_frame = cached = None
    for t, frame in timed:
      if t0 is None:
        t0 = t
      if frame is not cached_frame:  # repeated frames convert once
        cached_frame, cached = frame, _to_rgb(frame, target)
      yield t - t0, cached
    if t0 is None:
      raise VideoDecodeError(path, NO_FRAMES, "no frames could be decoded")


def _to_rgb(frame: av.VideoFrame, target: tuple[int, int] | None) -> np.ndarray:
  rotation = _rotation(frame)
  image = frame.to_image()  # any pix_fmt -> RGB24 via swscale
  if target is not None:
    # Crop in coded orientation so the rotated result has the target shape.
    h, w = target if rotation % 180 == 0 else target[::-1]
    rgb = resize_and_crop(image, (h, w))
  else:
    rgb = np.asarray(image)
  if rotation:
    rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
  return rgb


def read_video(path: str, *, fps: float | None = 8.0,
               resolution: Resolution = None) -> np.ndarray:
  """Reads a whole video as uint8 `[T, H, W, 3]` RGB (see iter_video_frames)."""
  frames = [f for _, f in iter_video_frames(path, fps=fps,
                                            resolution=resolution)]
  return np.stack(frames)


def iter_clips(path: str, *, num_frames: int, stride: int | None = None,
               fps: float | None = 8.0, resolution: Resolution = None,
               max_clips: int = 0) -> Iterator[Clip]:
  """Cuts a video into clips of `num_frames` frames.

  Args:
    path: the video file.
    num_frames: frames per clip (after resampling to `fps`).
    stride: frames between clip starts; defaults to `num_frames`
      (back-to-back clips). Larger values leave gaps, smaller ones overlap.
    fps: see `iter_video_frames`.
    resolution: see `resize_and_crop`.
    max_clips: stop after this many clips (and stop decoding); 0 = no limit.

  Yields:
    Clips in time order.

  Raises:
    VideoDecodeError: as `iter_video_frames`, and `TOO_SHORT` when the video
      does not hold one whole clip.
  """
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  stride = num_frames if stride is None else stride
  if stride < 1:
    raise ValueError(f"stride must be >= 1, got {stride}")
  window: list[tuple[float, np.ndarray]] = []
  skip = 0
  seen = made = 0
  for t, frame in iter_video_frames(path, fps=fps, resolution=resolution):
    seen += 1
    if skip:
      skip -= 1
      continue
    window.append((t, frame))
    if len(window) < num_frames:
      continue
    yield Clip(frames=np.stack([f for _, f in window]), start_time=window[0][0])
    made += 1
    if max_clips and made >= max_clips:
      return
    window = window[stride:]
    skip = max(0, stride - num_frames)
  if not made:
    rate = f" at {fps:g} fps" if fps else ""
    raise VideoDecodeError(
        os.fspath(path), TOO_SHORT,
        f"too short for one clip: {_frames(seen)}{rate}, a clip needs "
        f"{num_frames}")


def read_clips(path: str, **kwargs) -> list[Clip]:
  """All clips of a video as a list (arguments as `iter_clips`)."""
  return list(iter_clips(path, **kwargs))


def read_image(path: str, *, resolution: Resolution = None,
               num_frames: int = 1) -> np.ndarray:
  """Reads an image as an RGB uint8 clip `[num_frames, H, W, 3]`.

  EXIF orientation is applied; transparency is composited onto white; 16-bit
  images are scaled to 8 bits. With `num_frames > 1` the image is repeated
  (a still clip).

  Raises:
    VideoDecodeError: missing, empty, unreadable or undecodable files.
  """
  path = os.fspath(path)
  _check_file(path)
  try:
    data = storage.read_bytes(path)
  except storage.StorageError as e:
    raise VideoDecodeError(path, UNREADABLE, f"cannot read file: {e}") from e
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      image = ImageOps.exif_transpose(image)
      rgb = _image_to_rgb(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise VideoDecodeError(path, BAD_IMAGE, f"cannot decode image: {e}") from e
  frame = resize_and_crop(rgb, resolution)
  return np.repeat(frame[None], num_frames, axis=0)


def _image_to_rgb(image: Image.Image) -> Image.Image:
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    # 16-bit / float grey: PIL's convert("RGB") would clip, not scale.
    arr = np.asarray(image, dtype=np.float64)
    wide = image.mode.startswith("I;16") or arr.max() > 255
    peak = 65535.0 if wide else 255.0
    arr = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L").convert("RGB")
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


# ----------------------------------------------------------------------------
# Encoding.


def _as_uint8_frames(frames) -> np.ndarray:
  """[T,H,W], [T,H,W,1] or [T,H,W,3]; uint8, or float in [0, 1]."""
  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[..., None]
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
    raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
  if frames.shape[-1] == 1:
    frames = np.repeat(frames, 3, axis=-1)
  if np.issubdtype(frames.dtype, np.floating):
    frames = np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)
  elif frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8 or float in [0, 1], got "
                     f"{frames.dtype}")
  return frames


def write_video(path: str, frames: np.ndarray | Sequence[np.ndarray],
                fps: float = 8.0, *, crf: int = 18) -> None:
  """Writes RGB frames as H.264 (libx264, yuv420p) mp4.

  Args:
    path: output file (its extension picks the container).
    frames: uint8 (or float in [0, 1]) `[T, H, W, 3]` RGB, or grey
      `[T, H, W]`. Odd sizes are padded by one edge row/column, which
      yuv420p requires.
    fps: frame rate.
    crf: x264 quality (0 = lossless, 18 = visually lossless, 23 = default).
  """
  frames = _as_uint8_frames(frames)
  pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
  if pad_h or pad_w:
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)),
                    mode="edge")
  rate = fractions.Fraction(fps).limit_denominator(1001)
  path = os.fspath(path)
  with storage.staged_file(path, suffix=_extension(path)) as local, \
      av.open(local, mode="w") as out:
    stream = out.add_stream("libx264", rate=rate)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf)}
    for frame in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    out.mux(stream.encode())


def _extension(path: str) -> str:
  """The output's extension (FFmpeg picks the container from it); mp4 if none."""
  return storage.splitext(storage.basename(path))[1] or ".mp4"


class VideoWriter:
  """Streams RGB frames into an H.264 mp4, so long videos never sit in memory.

    with VideoWriter("story.mp4", fps=8) as out:
      out.write(frames)  # uint8 [T, H, W, 3] (or float in [0, 1]); any number of calls

  The frames go to a local temporary file that `close()` moves (or uploads,
  for `gs://`) to `path` whole; leaving the block on an error publishes
  nothing.
  """

  def __init__(self, path: str, fps: float = 8.0, *, crf: int = 18):
    self.path, self.fps, self.crf = os.fspath(path), fps, crf
    self.frames_written = 0
    self._out = self._stream = None
    self._pad = (0, 0)
    self._staged = contextlib.ExitStack()

  def _open(self, height: int, width: int) -> None:
    self._pad = (height % 2, width % 2)  # yuv420p needs even sizes
    local = self._staged.enter_context(storage.staged_file(self.path,
                                                           suffix=_extension(self.path)))
    self._out = av.open(local, mode="w")
    rate = fractions.Fraction(self.fps).limit_denominator(1001)
    self._stream = self._out.add_stream("libx264", rate=rate)
    self._stream.width, self._stream.height = width + self._pad[1], height + self._pad[0]
    self._stream.pix_fmt = "yuv420p"
    self._stream.options = {"crf": str(self.crf)}

  def write(self, frames: np.ndarray | Sequence[np.ndarray]) -> None:
    frames = _as_uint8_frames(frames)
    if self._out is None:
      self._open(frames.shape[1], frames.shape[2])
    if any(self._pad):
      frames = np.pad(frames, ((0, 0), (0, self._pad[0]), (0, self._pad[1]), (0, 0)),
                      mode="edge")
    for frame in frames:
      self._out.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    self.frames_written += len(frames)

  def close(self) -> None:
    if self._out is not None:
      self._out.mux(self._stream.encode())
      self._out.close()
      self._out = None
      self._staged.close()  # publishes the file

  def _discard(self) -> None:
    if self._out is not None:
      self._out.close()
      self._out = None
    # Leaving the staged file with an error removes it, publishing nothing.
    self._staged.__exit__(RuntimeError, RuntimeError("discarded"), None)

  def __enter__(self) -> "VideoWriter":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is None:
      self.close()
    else:
      self._discard()


def write_gif(path: str, frames: np.ndarray | Sequence[np.ndarray],
              fps: float = 8.0) -> None:
  """Writes RGB frames as a looping GIF (uint8, or float in [0, 1])."""
  frames = _as_uint8_frames(frames)
  images = [Image.fromarray(f) for f in frames]
  # GIF stores delays in 1/100 s.
  duration = max(10, int(round(1000.0 / fps / 10.0)) * 10)
  buf = io.BytesIO()
  images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                 duration=duration, loop=0)
  storage.write_bytes(os.fspath(path), buf.getvalue())
