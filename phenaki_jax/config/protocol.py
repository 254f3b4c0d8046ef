"""The evaluation protocol: how reconstruction metrics and FVD are measured.

FVD is comparable only under the same protocol, so every report records it.
The limits of the pretrained networks a protocol uses (I3D, LPIPS) live here
too, as the bottom layer; phenaki_jax/pretrained/perceptual.py imports them.
"""
from __future__ import annotations

import ml_collections

from phenaki_jax.config import errors

# I3D's network downsamples time by 8 and space by 32, then its logits layer
# average-pools a (2, 7, 7) window: the smallest clip it can classify.
I3D_MIN_FRAMES_FOR_LOGITS = 9
I3D_MIN_RESOLUTION_FOR_LOGITS = 193
I3D_ENDPOINTS = ("Conv3d_2c_3x3", "Mixed_3c", "Mixed_4f", "Mixed_5c", "Logits")
LPIPS_NETS = ("vgg16", "alexnet")


def recon_defaults() -> ml_collections.ConfigDict:
  """A tokenizer's reconstructions (phenaki_jax/eval/recon.py): `protocol.*`, `eval_protocol.*`."""
  p = ml_collections.ConfigDict()
  p.num_clips = 256  # held-out clips; FVD is biased upward for few clips
  p.batch_size = 16  # clips per reconstruction / I3D call
  p.fvd = True
  p.fvd_resolution = 224  # I3D input side (frames are resized, bilinear + antialias)
  p.fvd_num_frames = -1  # the first N frames of each clip go to I3D; -1: all (>= 9)
  p.lpips = True
  p.lpips_net = "alexnet"  # the LPIPS authors' choice for a metric; 'vgg16' also works
  p.lpips_frames_per_clip = -1  # evenly spaced frames per clip; -1: all
  return p


def check_recon(config: ml_collections.ConfigDict) -> None:
  """`config.protocol` as recon_defaults has it."""
  p = config.protocol
  errors.positive_ints(config, ["protocol.num_clips", "protocol.batch_size"])
  errors.require(p.lpips_net in LPIPS_NETS, "protocol.lpips_net", p.lpips_net,
                 f"must be one of {LPIPS_NETS}")
  errors.require(isinstance(p.lpips_frames_per_clip, int) and p.lpips_frames_per_clip >= -1
                 and p.lpips_frames_per_clip != 0, "protocol.lpips_frames_per_clip",
                 p.lpips_frames_per_clip, "must be a positive number of frames, or -1 for all")
  if p.fvd:
    min_res, min_frames = I3D_MIN_RESOLUTION_FOR_LOGITS, I3D_MIN_FRAMES_FOR_LOGITS
    errors.require(isinstance(p.fvd_resolution, int) and p.fvd_resolution >= min_res,
                   "protocol.fvd_resolution", p.fvd_resolution,
                   f"must be >= {min_res} for I3D logits (224 is standard)")
    errors.require(p.fvd_num_frames == -1 or (isinstance(p.fvd_num_frames, int)
                                              and p.fvd_num_frames >= min_frames),
                   "protocol.fvd_num_frames", p.fvd_num_frames,
                   f"must be >= {min_frames} (I3D needs {min_frames} frames), or -1 for all "
                   "frames of the clip; set protocol.fvd=False for shorter clips")


def generated_defaults() -> ml_collections.ConfigDict:
  """Generated video against a reference set (phenaki_jax/eval/eval_generated.py checks it).

  Copied verbatim into the report (with the values -1 resolved to), and
  compared by configs/eval.py:compare.
  """
  p = ml_collections.ConfigDict()
  p.fvd = True
  p.num_clips = 256  # clips per set per FVD; below 256 the report warns
  p.num_frames = -1  # frames per clip given to I3D (>= 9); -1: the generated clips' length
  p.frame_stride = 1  # take every k-th frame: a clip spans (num_frames - 1)·k + 1 frames
  p.fps = 0.0  # decode folder videos resampled to this rate; 0: every frame as stored
  p.clips_per_video = 1  # non-overlapping clips cut from each video's start (stories: all)
  p.resolution = -1  # frame side both sets are brought to on the host; -1: the generated side
  p.center_crop = True  # non-square frames: centre square crop (False: stretched)
  p.resize = "bilinear_antialias"  # to fvd_resolution for I3D: or 'bilinear' (no antialiasing)
  p.fvd_resolution = 224
  p.seed = 0  # which files / records / shapes clips are taken, in which order
  p.repeats = 1  # FVD mean ± std over this many
  p.repeat_mode = "disjoint"  # 'disjoint' subsets of num_clips, or 'bootstrap' resamples
  p.batch_size = 8  # clips per I3D call, split over the local devices
  return p


# Frame prediction (phenaki_jax/eval/frame_prediction.py): the settings of the
# two benchmarks the paper reports, BAIR robot pushing and Kinetics-600, both at
# 64×64. Neither dataset can be read here; on them, prepare the test split and
# keep these values (and raise samples_per_clip / num_clips to the counts the
# published figures use, PUBLISHED_COUNTS) before comparing.
PREDICTION_PRESETS = {
    "bair": {"context_frames": 1, "predict_frames": 15, "resolution": 64},
    "kinetics": {"context_frames": 5, "predict_frames": 11, "resolution": 64},
}
PUBLISHED_COUNTS = {
    "bair": "256 test clips, 100 samples each (the BAIR convention of Babaeizadeh et al. "
            "2018 and Weissenborn et al. 2020)",
    "kinetics": "50,000 clips of the Kinetics-600 test split (Luc et al. 2020)",
}
PREDICTION_TEXT = ("caption", "none")


def prediction_defaults(preset: str = "bair") -> ml_collections.ConfigDict:
  """`protocol.*` of the frame-prediction job, from one of PREDICTION_PRESETS.

  Copied into the report with what each value means; a value changed from
  the preset's is named there.
  """
  p = ml_collections.ConfigDict()
  p.preset = preset
  p.update(PREDICTION_PRESETS[preset])
  p.fps = 0.0  # a folder's videos are resampled to this rate; 0: every stored frame
  p.num_clips = 256  # held-out clips, the first context_frames + predict_frames frames of each
  p.samples_per_clip = 1  # predictions per clip (each from its own seed)
  p.seed = 0  # sample s of clip i, window w draws from seed + (w·S + s)·N + i
  # What each clip's prediction is conditioned on besides its frames: its
  # 'caption' (empty where the data has none, as on BAIR), or 'none'.
  p.text = "caption"
  # More frames than one generator window holds: False refuses (naming both
  # counts); True predicts window after window, each going on from the last
  # rollout_context_frames frames (-1: about half a window, as a story).
  p.rollout = False
  p.rollout_context_frames = -1
  p.fvd = True
  p.fvd_resolution = 224
  p.lpips = True
  p.lpips_net = "alexnet"
  return p


def check_prediction(config: ml_collections.ConfigDict) -> None:
  """`config.protocol` as prediction_defaults has it (what needs no generator)."""
  p = config.protocol
  errors.require(p.preset in PREDICTION_PRESETS, "protocol.preset", p.preset,
                 f"must be one of {sorted(PREDICTION_PRESETS)}")
  errors.positive_ints(config, ["protocol.context_frames", "protocol.predict_frames",
                                "protocol.resolution", "protocol.num_clips",
                                "protocol.samples_per_clip"])
  errors.require(p.fps >= 0, "protocol.fps", p.fps, "must be >= 0 (0: every stored frame)")
  errors.require(isinstance(p.seed, int) and p.seed >= 0, "protocol.seed", p.seed, "must be >= 0")
  errors.require(p.text in PREDICTION_TEXT, "protocol.text", p.text,
                 f"must be one of {PREDICTION_TEXT}")
  errors.require(isinstance(p.rollout, bool), "protocol.rollout", p.rollout,
                 "must be True or False")
  errors.require(isinstance(p.rollout_context_frames, int) and p.rollout_context_frames >= -1
                 and p.rollout_context_frames != 0, "protocol.rollout_context_frames",
                 p.rollout_context_frames, "must be a frame count, or -1 for about half a window")
  errors.require(p.lpips_net in LPIPS_NETS, "protocol.lpips_net", p.lpips_net,
                 f"must be one of {LPIPS_NETS}")
  if p.fvd:
    min_frames = I3D_MIN_FRAMES_FOR_LOGITS
    errors.require(p.predict_frames >= min_frames, "protocol.predict_frames", p.predict_frames,
                   f"FVD of the predicted frames needs >= {min_frames} of them (I3D); predict "
                   "more or set protocol.fvd=False")
    errors.require(isinstance(p.fvd_resolution, int)
                   and p.fvd_resolution >= I3D_MIN_RESOLUTION_FOR_LOGITS,
                   "protocol.fvd_resolution", p.fvd_resolution,
                   f"must be >= {I3D_MIN_RESOLUTION_FOR_LOGITS} for I3D logits (224 is standard)")


def prediction_changes(p: ml_collections.ConfigDict) -> dict:
  """{key: (preset value, this protocol's)} for each preset value the protocol changed."""
  preset = PREDICTION_PRESETS[p.preset]
  return {k: (v, p[k]) for k, v in preset.items() if p[k] != v}
