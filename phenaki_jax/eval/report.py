"""Writing an eval_generated report: report.json and report.png.

The figure is drawn with PIL (no plotting library in the stack): a header
with the sets and the protocol, a strip of middle frames from each set (a
quick look at whether the clips are what you think they are), one bar per
metric that lives on [0, 1] (accuracies, CLIP cosine; CLIP score on [0, 100])
with FVD as a number, and for stories a timeline per story: segments to
scale, green where the shapes scorer found the prompt, red where not, grey
where unscored, ticks where a generator window starts.
"""
from __future__ import annotations

import io
import json
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from phenaki_jax import storage

_WIDTH = 720
_ROW = 14
_BAR_X, _BAR_W = 230, 380
_GREEN, _RED, _GREY, _BLUE = (60, 170, 80), (210, 70, 60), (170, 170, 170), (70, 110, 200)


def write_json(path: str, payload: dict[str, Any]) -> None:
  """`payload` as JSON at `path` (local or gs://), written whole: readers never see
  half a report."""
  # NaN (an undefined seam ratio) is not JSON: written as null.
  text = json.dumps(_finite(payload), indent=2, default=_jsonable, allow_nan=False)
  storage.write_text(path, text + "\n")


def write_png(path: str, image: Image.Image) -> None:
  """A PIL image as a PNG at `path` (local or gs://), written whole."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())


def _finite(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, (float, np.floating)) and not math.isfinite(x):
    return None
  return x


def _jsonable(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    if not math.isfinite(v):
      return "nan"
    return f"{v:.4g}"
  return str(v)


def summary_line(metrics: dict[str, Any]) -> str:
  shown = [k for k in ("fvd", "fvd_std", "fvd_clips", "shapes/all", "clip_score",
                       "story/segment_all", "story/seam_ratio", "story/clip_score")
           if k in metrics]
  return " ".join(f"{k}={_fmt(metrics[k])}" for k in shown) or "(no metrics)"


def _bar_metrics(metrics: dict[str, Any]) -> list[tuple[str, float, float]]:
  """(name, value, full scale) of the metrics a bar shows."""
  out = []
  for k, v in metrics.items():
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
      continue
    if k.startswith(("shapes/", "story/segment_", "story/keeps_")) and not k.endswith(
        "num_clips"):
      out.append((k, float(v), 1.0))
    elif k in ("clip_cosine",):
      out.append((k, float(v), 1.0))
    elif k in ("clip_score", "story/clip_score"):
      out.append((k, float(v), 100.0))
    elif k == "story/seam_ratio":
      out.append((k, float(v), max(2.0, float(v))))  # 1 = seams like the inside of a window
  return out


def _thumb_row(frames: Sequence[np.ndarray], side: int = 64) -> np.ndarray | None:
  if not frames:
    return None
  tiles = [np.asarray(Image.fromarray(f).resize((side, side), Image.NEAREST)) for f in frames]
  gap = np.full((side, 2, 3), 255, np.uint8)
  return np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)


def draw_figure(report: dict[str, Any], gen_thumbs: Sequence[np.ndarray],
                ref_thumbs: Sequence[np.ndarray]) -> Image.Image:
  font = ImageFont.load_default()
  metrics = report["metrics"]
  bars = _bar_metrics(metrics)
  stories = report.get("stories") or []
  p = report["protocol"]["resolved"]
  header = [
      f"{report['name']}: {report['generated'].get('kind')} {report['generated'].get('path')}",
      f"reference: {report['reference'].get('kind')} {report['reference'].get('path', '')}"
      f"  clips: {report['generated']['clips']} generated / {report['reference']['clips']} ref",
      f"protocol: {p['num_frames']} frames at {p['resolution']}px, I3D at "
      f"{report['protocol']['fvd_resolution']} ({report['protocol']['resize']}), "
      f"seed {report['protocol']['seed']}, {p['repeats']}",
  ]
  if "fvd" in metrics:
    fvd = f"FVD {metrics['fvd']:.2f}"
    if "fvd_std" in metrics:
      fvd += f" ± {metrics['fvd_std']:.2f}"
    header.append(fvd + f"  ({int(metrics['fvd_clips'])} clips per set)")
  if report.get("warnings"):
    header.append(f"{len(report['warnings'])} warning(s): see report.json")
  thumbs = [("generated", _thumb_row(gen_thumbs)), ("reference", _thumb_row(ref_thumbs))]
  thumbs = [(label, t) for label, t in thumbs if t is not None]
  height = (8 + _ROW * len(header) + sum(t.shape[0] + _ROW + 4 for _, t in thumbs)
            + 8 + _ROW * len(bars) + sum(3 * _ROW + 10 for _ in stories[:6]) + 10)
  image = Image.new("RGB", (_WIDTH, height), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  y = 6
  for line in header:
    draw.text((6, y), line[:115], fill=(0, 0, 0), font=font)
    y += _ROW
  for label, row in thumbs:
    draw.text((6, y), f"{label} (middle frames)", fill=(80, 80, 80), font=font)
    y += _ROW
    image.paste(Image.fromarray(row), (6, y))
    y += row.shape[0] + 4
  y += 8
  for name, value, scale in bars:
    draw.text((6, y), name, fill=(0, 0, 0), font=font)
    draw.rectangle([_BAR_X, y + 2, _BAR_X + _BAR_W, y + _ROW - 3], outline=_GREY)
    w = int(round(_BAR_W * min(max(value / scale, 0.0), 1.0)))
    if w:
      draw.rectangle([_BAR_X, y + 2, _BAR_X + w, y + _ROW - 3], fill=_BLUE)
    draw.text((_BAR_X + _BAR_W + 8, y), _fmt(value), fill=(0, 0, 0), font=font)
    y += _ROW
  for story in stories[:6]:
    s = story["story"]
    total = max(1, s["num_frames"])
    draw.text((6, y), f"story {story['name']}: seam ratio {_fmt(s.get('seam_ratio'))}",
              fill=(0, 0, 0), font=font)
    y += _ROW
    x0, width = 6, _WIDTH - 12
    for seg in s["segments"]:
      a = x0 + int(width * seg["start_frame"] / total)
      b = x0 + int(width * seg["end_frame"] / total) - 1
      shapes = seg.get("shapes")
      colour = _GREY if shapes is None else (_GREEN if shapes.get("all") else _RED)
      draw.rectangle([a, y, max(a, b), y + _ROW], fill=colour, outline=(255, 255, 255))
      for w in seg.get("window_starts", []):
        xw = x0 + int(width * w / total)
        draw.line([xw, y, xw, y + _ROW], fill=(0, 0, 0))
      label = f"{seg.get('index', '')}"
      if seg.get("clip_score") is not None:
        label += f" clip {seg['clip_score']:.1f}"
      draw.text((a + 2, y + _ROW + 1), label, fill=(0, 0, 0), font=font)
    y += 2 * _ROW + 10
  return image


def write_report(workdir: str, report: dict[str, Any], gen_thumbs: Sequence[np.ndarray],
                 ref_thumbs: Sequence[np.ndarray]) -> dict[str, str]:
  """Writes WORKDIR/report.json and WORKDIR/report.png (local or gs://); returns their paths."""
  storage.makedirs(workdir)
  paths = {"json": storage.join(workdir, "report.json"),
           "png": storage.join(workdir, "report.png")}
  write_json(paths["json"], report)
  write_png(paths["png"], draw_figure(report, gen_thumbs, ref_thumbs))
  return paths
