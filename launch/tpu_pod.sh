#!/usr/bin/env bash
# Create a Cloud TPU slice, install phenaki_jax on every worker, run, watch, stop, delete.
#
#   launch/tpu_pod.sh [--dry-run] COMMAND --name NAME --zone ZONE [options] [--config.KEY=VALUE ...]
#
# Commands:
#   create    the TPU VM slice (directly, or through a queued resource with --queued)
#   install   copy this checkout (or clone --repo) to every worker and pip install it with its [tpu] extra
#   run       start training on all workers (--worker=all) under nohup, one log file per worker
#   logs      show a worker's log (--worker N, default 0; --follow to keep tailing)
#   stop      stop the job on all workers
#   delete    delete the slice (and its queued resource)
#
# Options (defaults in brackets; most can also come from the environment):
#   --name NAME              TPU name, also the queued-resource id      [$TPU_NAME]
#   --accelerator TYPE       e.g. v5p-128, v5e-256 (= v5litepod-256), v6e-64, v4-32
#                                                                        [$TPU_ACCELERATOR]
#   --zone ZONE              e.g. us-east5-a                            [$TPU_ZONE]
#   --project PROJECT        GCP project                                [$GCP_PROJECT, else gcloud's]
#   --runtime-version V      TPU VM image         [from the accelerator: v2-alpha-tpuv5 for v5p, ...]
#   --queued                 create through a queued resource (waits for capacity; best for pods)
#   --spot | --reserved      capacity type (spot slices can be preempted at any time)
#   --repo URL [--ref REF]   install: git clone URL at REF on the workers instead of copying
#                            this checkout
#   --remote-dir DIR         checkout location on the workers           [phenaki_jax, under ~]
#   --config SPEC            run: config file and variant               [configs/cvivit.py:paper]
#   --workdir gs://B/P       run: checkpoints and logs; must be shared by all workers (GCS)
#   --run-name NAME          run: log file prefix on the workers        [basename of workdir]
#   --worker N               logs: which worker                        [0]
#   --follow                 logs: keep tailing
#   --dry-run                print every gcloud command instead of running it
#   --config.KEY=VALUE       run: passed on to phenaki_jax.main (any number)
#
# A preempted or stopped run resumes from its newest checkpoint: run again with the same
# --workdir. See launch/README.md.
set -euo pipefail

DRY_RUN=0
COMMAND=""
NAME="${TPU_NAME:-}"
ACCELERATOR="${TPU_ACCELERATOR:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${GCP_PROJECT:-}"
RUNTIME_VERSION=""
QUEUED=0
CAPACITY=""
REPO_URL=""
REF=""
REMOTE_DIR="phenaki_jax"
CONFIG="configs/cvivit.py:paper"
WORKDIR=""
RUN_NAME=""
WORKER=0
FOLLOW=0
OVERRIDES=()
LOG_DIR="phenaki_logs"  # under ~ on every worker

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# Quote one word so that a shell reads it back unchanged (and humans can read it).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or prints it with --dry-run (one line, shell-quoted).
run_cmd() {
  if (( DRY_RUN )); then
    local out="" word
    for word in "$@"; do out+="$(quote "$word") "; done
    echo "${out% }"
  else
    "$@"
  fi
}

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; NAME="$2"; shift ;;
    --name=*) NAME="${1#*=}" ;;
    --accelerator|--accelerator-type) need_value "$@"; ACCELERATOR="$2"; shift ;;
    --accelerator=*|--accelerator-type=*) ACCELERATOR="${1#*=}" ;;
    --zone) need_value "$@"; ZONE="$2"; shift ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project) need_value "$@"; PROJECT="$2"; shift ;;
    --project=*) PROJECT="${1#*=}" ;;
    --runtime-version|--version) need_value "$@"; RUNTIME_VERSION="$2"; shift ;;
    --runtime-version=*|--version=*) RUNTIME_VERSION="${1#*=}" ;;
    --queued) QUEUED=1 ;;
    --spot) CAPACITY="spot" ;;
    --reserved) CAPACITY="reserved" ;;
    --repo) need_value "$@"; REPO_URL="$2"; shift ;;
    --repo=*) REPO_URL="${1#*=}" ;;
    --ref) need_value "$@"; REF="$2"; shift ;;
    --ref=*) REF="${1#*=}" ;;
    --remote-dir) need_value "$@"; REMOTE_DIR="$2"; shift ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --config) need_value "$@"; CONFIG="$2"; shift ;;
    --config=*) CONFIG="${1#*=}" ;;
    --config.*) OVERRIDES+=("$1") ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --run-name) need_value "$@"; RUN_NAME="$2"; shift ;;
    --run-name=*) RUN_NAME="${1#*=}" ;;
    --worker) need_value "$@"; WORKER="$2"; shift ;;
    --worker=*) WORKER="${1#*=}" ;;
    --follow) FOLLOW=1 ;;
    create|install|run|logs|stop|delete)
      [[ -z "$COMMAND" ]] || die "two commands given: $COMMAND and $1"
      COMMAND="$1" ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$COMMAND" ]] || { usage >&2; die "no command given: create, install, run, logs, stop or delete"; }
[[ -n "$NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "--remote-dir '$REMOTE_DIR': letters, digits, _ . / - only"

# gcloud names v5e slices v5litepod-N; accept the common v5e-N spelling.
case "$ACCELERATOR" in
  v5e-*) ACCELERATOR="v5litepod-${ACCELERATOR#v5e-}" ;;
esac

default_runtime_version() {
  case "$1" in
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v4-*) echo "tpu-ubuntu2204-base" ;;
    *) return 1 ;;
  esac
}

GCLOUD_LOCATION=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_LOCATION+=(--project="$PROJECT")

ssh_all() {  # ssh_all WORKER REMOTE_COMMAND
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOCATION[@]}" --worker="$1" \
    --command="$2"
}

cmd_create() {
  [[ -n "$ACCELERATOR" ]] || die "create needs --accelerator (e.g. v5p-128, v5e-256)"
  if [[ -z "$RUNTIME_VERSION" ]]; then
    RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR")" ||
      die "no default runtime version for --accelerator=$ACCELERATOR: pass --runtime-version"
  fi
  local capacity=()
  [[ -z "$CAPACITY" ]] || capacity=(--"$CAPACITY")
  if (( QUEUED )); then
    run_cmd gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
      "${GCLOUD_LOCATION[@]}" --accelerator-type="$ACCELERATOR" \
      --runtime-version="$RUNTIME_VERSION" "${capacity[@]}"
    echo "# queued: wait for state ACTIVE with" >&2
    echo "#   gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" >&2
  else
    run_cmd gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION" "${capacity[@]}"
  fi
}

cmd_install() {
  # The TPU images ship Python 3.10+ but not always venv; the [tpu] extra brings
  # the libtpu that matches the pinned jax (setup.py).
  local setup="set -e; cd ~/$REMOTE_DIR"
  setup+="; python3 -c 'import ensurepip' 2>/dev/null || (sudo apt-get update -q && sudo apt-get install -yq python3-venv)"
  setup+="; [ -d .venv ] || python3 -m venv .venv"
  setup+="; . .venv/bin/activate && pip install -q -U pip"
  setup+=" && pip install -q -e '.[tpu]'"
  setup+=" && python -c 'import phenaki_jax, jax; print(jax.__version__)'"
  if [[ -n "$REPO_URL" ]]; then
    local fetch="set -e; [ -d ~/$REMOTE_DIR/.git ] || git clone -q $(quote "$REPO_URL") ~/$REMOTE_DIR"
    fetch+="; cd ~/$REMOTE_DIR && git fetch -q origin"
    [[ -z "$REF" ]] || fetch+=" && git checkout -q $(quote "$REF")"
    ssh_all all "$fetch; $setup"
  else
    # This checkout as it is (tracked and untracked files git does not ignore).
    local repo_root tarball="/tmp/${NAME}_phenaki_jax.tgz"
    repo_root="$(cd "$(dirname "$0")/.." && pwd)"
    if (( DRY_RUN )); then
      echo "# pack $repo_root (git ls-files -co --exclude-standard) into $tarball"
    else
      (cd "$repo_root" && git ls-files -co --exclude-standard -z |
        tar czf "$tarball" --null -T -)
    fi
    run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$NAME:phenaki_jax_src.tgz" \
      "${GCLOUD_LOCATION[@]}" --worker=all
    ssh_all all "mkdir -p ~/$REMOTE_DIR && tar xzf ~/phenaki_jax_src.tgz -C ~/$REMOTE_DIR && $setup"
  fi
}

cmd_run() {
  [[ -n "$WORKDIR" ]] || die "run needs --workdir (gs://bucket/path, shared by all workers)"
  [[ "$WORKDIR" == gs://* ]] ||
    die "--workdir=$WORKDIR: every worker must see the same checkpoints; use a gs:// path"
  local name="${RUN_NAME:-$(basename "$WORKDIR")}"
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name '$name': letters, digits, _ . - only"
  local args=(--config="$CONFIG" --workdir="$WORKDIR" --distributed=on "${OVERRIDES[@]}")
  local quoted="" word
  for word in "${args[@]}"; do quoted+=" $(quote "$word")"; done
  # nohup + no terminal: the job outlives the ssh session. One log per worker
  # (\$(hostname) expands there), and a pid file for stop.
  local remote="set -e; cd ~/$REMOTE_DIR; . .venv/bin/activate; mkdir -p ~/$LOG_DIR"
  remote+="; log=~/$LOG_DIR/$name-\$(hostname).log"
  remote+="; nohup python -m phenaki_jax.main$quoted > \"\$log\" 2>&1 < /dev/null &"
  remote+=" echo \$! > ~/$LOG_DIR/job.pid; echo \"started on \$(hostname): \$log\""
  ssh_all all "$remote"
}

cmd_logs() {
  local tail_cmd="tail -n 200"
  (( FOLLOW )) && tail_cmd="tail -n 200 -F"
  ssh_all "$WORKER" "$tail_cmd \$(ls -t ~/$LOG_DIR/*.log | head -n 1)"
}

cmd_stop() {
  # The pid file names exactly the process run started.
  ssh_all all "if [ -f ~/$LOG_DIR/job.pid ]; then kill \$(cat ~/$LOG_DIR/job.pid) 2>/dev/null || true; rm -f ~/$LOG_DIR/job.pid; fi"
}

cmd_delete() {
  if (( QUEUED )); then
    run_cmd gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_LOCATION[@]}" \
      --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_LOCATION[@]}" --quiet
  fi
}

"cmd_$COMMAND"
