#!/usr/bin/env bash
# Run the whole pipeline, or the test suite.
#
#   ./run_all.sh [--data DIR] [--work DIR] [--preset quick|full] [--set key=value ...]
#   ./run_all.sh --tests [pytest args]
#
# Without --data the built-in demo dataset is built (once) and used.
# Every stage skips finished work, so re-running after an interruption
# only redoes what was not finished.
set -euo pipefail
cd "$(dirname "$0")"
REPO="$(pwd)"

DATA=""
WORK="work"
PRESET="quick"
SETS=()
RUN_TESTS=0
PYTEST_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --preset|--config) PRESET="$2"; shift 2 ;;
    --set) SETS+=(--set "$2"); shift 2 ;;
    --tests) RUN_TESTS=1; shift; PYTEST_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '\n== %s ==\n' "$*"; }

# --- environment ---------------------------------------------------------------
PY="$REPO/.venv/bin/python"
setup_python() {
  if [[ ! -x "$PY" ]]; then
    log "creating the virtual environment .venv"
    python3 -m venv "$REPO/.venv"
  fi
  local stamp="$REPO/.venv/.requirements.sha1"
  local want; want="$(sha1sum requirements.txt | cut -d' ' -f1)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    log "installing Python requirements into .venv"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -r requirements.txt
    echo "$want" > "$stamp"
  fi
}

setup_demo_tools() {
  # fluidsynth + the FluidR3 GM soundfont render the demo dataset
  if command -v fluidsynth >/dev/null 2>&1 && [[ -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ]]; then
    return 0
  fi
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian packages fluidsynth fluid-soundfont-gm (for the demo dataset)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian packages fluidsynth fluid-soundfont-gm with sudo (for the demo dataset)"
    sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null
  else
    echo "run_all.sh: the demo dataset needs fluidsynth and the FluidR3 GM soundfont." >&2
    echo "  Install them (Debian/Ubuntu: apt-get install fluidsynth fluid-soundfont-gm)," >&2
    echo "  or pass --data DIR with a dataset in the FSDKaggle2018 layout." >&2
    exit 3
  fi
}

setup_python
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

if [[ "$RUN_TESTS" == "1" ]]; then
  setup_demo_tools
  log "running the test suite"
  exec "$PY" -m pytest -q "${PYTEST_ARGS[@]}"
fi

if [[ -z "$DATA" ]]; then
  setup_demo_tools
  log "demo dataset"
  DATA="$("$PY" -m data.build_demo --out "$REPO/demo_data")"
fi

# --- one run per work directory at a time ------------------------------------------
if ! mkdir -p "$WORK" 2>/dev/null || [[ ! -d "$WORK" || ! -w "$WORK" ]]; then
  echo "error: --work $WORK: cannot create or write to it; pass a folder you can write to" >&2
  exit 2
fi
exec 9>>"$WORK/.lock"
if ! flock -n 9; then
  holder="$(cat "$WORK/.lock.json" 2>/dev/null || echo 'another process')"
  echo "error: --work $WORK is in use by another run ($holder); wait for it to finish or pass another --work" >&2
  exit 2
fi
export AT_WORK_LOCK="$(cd "$WORK" && pwd -P)"
export AT_RUN_ID="$(date +%Y%m%d-%H%M%S)-$$"
printf '{"pid": %d, "host": "%s", "what": "run_all.sh", "since": "%s"}\n' "$$" "$(hostname)" \
  "$(date '+%Y-%m-%d %H:%M:%S')" > "$WORK/.lock.json"

ARGS=(--config "$PRESET" --data "$DATA" --work "$WORK" "${SETS[@]}")
stage() { local name="$1"; shift; log "$name"; "$PY" -m "$@" "${ARGS[@]}"; }

START=$(date +%s)
stage "features" pipeline.features
stage "folds" pipeline.folds
stage "pseudo-label verification" pipeline.pseudo_label
stage "training" pipeline.train
stage "stacking" stacking.stack
stage "report" pipeline.report
log "done in $(( $(date +%s) - START )) s"
CHANGED="$WORK/logs/$AT_RUN_ID/changed.txt"
if [[ -s "$CHANGED" ]]; then
  echo "stages that did work: $(cut -f1 "$CHANGED" | sort -u | tr '\n' ' ')(logs: $WORK/logs/$AT_RUN_ID/)"
else
  echo "identical rerun: every stage was up to date, nothing recomputed (logs: $WORK/logs/$AT_RUN_ID/)"
fi
"$PY" -m pipeline.summary "${ARGS[@]}"
