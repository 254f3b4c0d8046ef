"""Entry point: python -m phenaki_jax.main --config=configs/JOB.py[:variant] --workdir=DIR.

Dispatches on config.job: 'cvivit' trains the tokenizer, 'maskgit' the
generator on a trained tokenizer's codes, 'sample' writes videos from prompts,
'eval_*' evaluates a checkpoint, 'pretokenize' writes a tokenizer's codes (and
frozen text embeddings) for the generator, 'prepare' turns a manifest of
videos/images into ArrayRecord shards.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from phenaki_jax import distributed  # noqa: E402  (defines the multi-process flags)
from phenaki_jax import console  # noqa: E402
from phenaki_jax import storage  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file (and :variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and outputs go.")
_LIBRARY_LOGS = flags.DEFINE_bool(
    "library_logs", False, "Also print the libraries' INFO lines (Orbax's checkpoint machinery, "
    "CLU, grain); by default the console shows this job's own lines and every warning.")
flags.mark_flags_as_required(["config", "workdir"])


# Job name (config.job) -> the module whose run(config, workdir) does it. Imported
# only when dispatched: a job's dependencies (trainers, TF for CLU, PyAV) load
# only for the job that needs them.
JOBS = {
    "cvivit": "phenaki_jax.train.train_cvivit",
    "maskgit": "phenaki_jax.train.train_maskgit",
    "sample": "phenaki_jax.sampling.sample",
    "pretokenize": "phenaki_jax.data.pretokenize",
    "prepare": "phenaki_jax.data.prepare",
    "eval_tokenizer": "phenaki_jax.eval.eval_tokenizer",  # configs/eval.py
    "eval_generated": "phenaki_jax.eval.eval_generated",  # configs/eval.py:generated
    "eval_compare": "phenaki_jax.eval.eval_compare",  # configs/eval.py:compare
    "eval_prediction": "phenaki_jax.eval.eval_prediction",  # configs/eval.py:frame_prediction
}


def run_job(config, workdir: str):
  job = config.get("job")
  if job not in JOBS:
    raise ValueError(f"config.job={job!r}: unknown job; expected one of {sorted(JOBS)}")
  if storage.is_remote(workdir):
    # A missing bucket fails here, naming it, before the job loads or compiles anything.
    storage.check_writable_root(workdir, "--workdir")
  module = importlib.import_module(JOBS[job])
  # Processes that start together can be far apart by now (imports on a
  # loaded host): line them up before the job's first collective.
  distributed.wait_for_all(f"start_{job}")
  return module.run(config, workdir)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config override errors that name the key.

  ml_collections reports an unknown override as a bare KeyError('foo').
  """
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    text = str(e).replace("\\n", "\n")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    culprits = [a for a in overrides
                if any(f"'{part}'" in text or f'"{part}"' in text
                       for part in a.split("=", 1)[0].split(".")[1:])]
    where = culprits[0] if culprits else (overrides[0] if overrides else "the config")
    hint = re.search(r"Did you mean[^?]*\?", text)
    print(f"error: unknown config key in {where}: the config has no such key"
          f"{' (' + hint.group(0) + ')' if hint else ''}; every key is listed in "
          "phenaki_jax/config/", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if storage.is_remote(_WORKDIR.value):
    try:  # first, and one line, not a traceback: a bucket that is not there
      storage.check_writable_root(_WORKDIR.value, "--workdir")
    except storage.StorageError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  # TensorFlow (pulled in by CLU's writers) must not take the accelerator.
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass
  logging.set_verbosity(logging.INFO)
  console.quiet_library_logs(not _LIBRARY_LOGS.value)
  # Before anything touches a device: joining a multi-process job (and
  # --num_cpu_devices) must precede backend initialisation.
  try:
    distributed.initialize_from_flags()
  except distributed.DistributedInitError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  run_job(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
