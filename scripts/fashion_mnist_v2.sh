#!/usr/bin/env bash
# Fashion-MNIST v2 (issue 14): a 60-epoch teacher; 40-epoch students: CE, KD (3 seeds), the entropy
# term studied (γ 0 / 0.1 / 0.25 / 0.5, T = 2, L_E in place of CE, a γ ramp; 1 seed each), the best
# ERDE setting on validation with 2 more seeds, and v1's architecture under KD for reference; then
# calibration, the test evaluation with a paired bootstrap ERDE vs KD (reports/fashion-mnist-v2.md)
# and the winner on validation exported as model_store/fashion-mnist/2.
#
# Idempotent and resumable: a finished run is skipped, an interrupted one resumes from its last
# checkpoint (at most one epoch lost per run), a finished step is not redone. Kill it at any time
# and start it again. Runs go LANES at a time (processes side by side: on one GPU, or on CPU cores).
# The teacher runs its 60 epochs (a fixed schedule, not a plateau rule: cosine decay ends at 0).
#
# Options are environment variables (defaults below). A dry run on the synthetic set, seconds a run:
#   DATASET=synthetic TEACHER_ARCH=tiny STUDENT_ARCH=tiny REFERENCE_ARCH=tiny T_EPOCHS=2 S_EPOCHS=2 \
#     RUNS=/tmp/v2 STORE=/tmp/v2/model_store REPORT=/tmp/v2/reports EXTRA="--max-train-batches 2" \
#     scripts/fashion_mnist_v2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
read -ra ERDE <<< "${ERDE:-.venv/bin/erde}"  # the device has no venv: ERDE="python3 -m erde.cli" PY=python3
PY=${PY:-.venv/bin/python}
DATASET=${DATASET:-fashion-mnist}
RUNS=${RUNS:-runs/v2}
T_EPOCHS=${T_EPOCHS:-60}
S_EPOCHS=${S_EPOCHS:-40}
BATCH=${BATCH:-256}  # twice v1's: half the steps of a launch-bound GPU loop; lr scaled with it
LR=${LR:-0.2}
TEACHER_ARCH=${TEACHER_ARCH:-resnet20}
STUDENT_ARCH=${STUDENT_ARCH:-resnet8-s2}  # its time tracks its MACs: reports/exit-latency.md
REFERENCE_ARCH=${REFERENCE_ARCH:-resnet8-slim}  # v1's student, one KD run beside the new one
LANES=${LANES:-2}
THREADS=${THREADS:-1}
read -ra EXTRA <<< "${EXTRA:-}"  # e.g. "--channels-last --compile" on a GPU
EXPORT=${EXPORT:-1}  # 0: stop after the report (export measures latency on the machine it runs on)
STORE=${STORE:-model_store}
VERSION=${VERSION:-2}
REPORT=${REPORT:-reports}
TITLE=${TITLE:-fashion-mnist-v2}
TEACHER=$RUNS/store/teacher/1

# Each student setting as data: its name and the distill options it adds (seed and folder come later).
declare -A SETTING=(
  [ce]="--loss ce"
  [kd]="--loss kd"
  [erde-g0]="--loss erde --gamma 0"
  [erde-g01]="--loss erde --gamma 0.1"
  [erde-g025]="--loss erde --gamma 0.25"
  [erde-g05]="--loss erde --gamma 0.5"
  [erde-g05-t2]="--loss erde --gamma 0.5 --temperature 2"
  [erde-g05-replace]="--loss erde --gamma 0.5 --entropy-replaces"
  [erde-g05-ramp]="--loss erde --gamma 0.5 --gamma-ramp 0.5"
  [slim-kd]="--loss kd --arch $REFERENCE_ARCH"
)
ERDE_SETTINGS=(erde-g0 erde-g01 erde-g025 erde-g05 erde-g05-t2 erde-g05-replace erde-g05-ramp)

common=(--dataset "$DATASET" --batch-size "$BATCH" --lr "$LR" --threads "$THREADS" "${EXTRA[@]}")

train_run() {  # train_run <folder> <erde verb and options...>: train, resume, or skip when finished; calibrate
  local out=$1; shift
  if [[ ! -f $out/weights.safetensors ]]; then
    if [[ -f $out/state.json ]]; then "${ERDE[@]}" "$@" --out "$out" --resume; else "${ERDE[@]}" "$@" --out "$out"; fi
  fi
  [[ -f $out/calibration.json ]] || "${ERDE[@]}" calibrate "$out" > /dev/null
}

student() {  # student <setting> <seed>
  local options
  read -ra options <<< "${SETTING[$1]}"
  train_run "$RUNS/$1-s$2" distill --arch "$STUDENT_ARCH" --teacher "$TEACHER" --epochs "$S_EPOCHS" --seed "$2" \
    "${common[@]}" "${options[@]}"
}

lane() {  # lane <setting> <seed>: start a student in the background once fewer than LANES run
  while (( $(jobs -rp | wc -l) >= LANES )); do wait -n || true; done
  local run=$1-s$2
  echo "$(date +%T) start $run"
  { if student "$1" "$2" > "$RUNS/logs/$run.log" 2>&1; then
      echo "$(date +%T) done  $run: $(tail -n 1 "$RUNS/$run/log.txt")"
    else
      echo "$(date +%T) FAILED $run (see $RUNS/logs/$run.log)"
    fi; } &
}

stop_lanes() {  # on a kill or an error: stop every run this script started (each resumes next time)
  local job
  for job in $(jobs -p); do pkill -TERM -P "$job" 2>/dev/null || true; kill -TERM "$job" 2>/dev/null || true; done
}
trap 'stop_lanes; exit 143' INT TERM
trap stop_lanes EXIT

mkdir -p "$RUNS/logs"
# 1. The teacher, with the CE student beside it (it needs no teacher).
lane ce 0
echo "$(date +%T) teacher"
train_run "$RUNS/teacher" train-teacher --arch "$TEACHER_ARCH" --epochs "$T_EPOCHS" --seed 0 "${common[@]}" \
  2> "$RUNS/logs/teacher.log"
[[ -f $TEACHER/manifest.json ]] || "${ERDE[@]}" export "$RUNS/teacher" --store "$RUNS/store" --name teacher \
  --version 1 --latency-repeats 0 > /dev/null

# 2. The entropy-term settings first (the choice waits on them), then the seeds that need no choice.
erde_jobs=()
for setting in "${ERDE_SETTINGS[@]}"; do lane "$setting" 0; erde_jobs+=($!); done
for seed in 0 1 2; do lane kd "$seed"; done
lane slim-kd 0
for job in "${erde_jobs[@]}"; do wait "$job" || true; done

# 3. The best ERDE setting on validation (seed 0), with two more seeds.
best=$("$PY" -m erde.compare choose --runs "$RUNS" "${ERDE_SETTINGS[@]}")
echo "$(date +%T) best ERDE setting on validation: $best"
for seed in 1 2; do lane "$best" "$seed"; done
wait

missing=()
for run in teacher ce-s0 kd-s{0,1,2} "${ERDE_SETTINGS[@]/%/-s0}" "$best"-s{1,2} slim-kd-s0; do
  [[ -f $RUNS/$run/calibration.json ]] || missing+=("$run")
done
if (( ${#missing[@]} )); then echo "unfinished: ${missing[*]} (logs in $RUNS/logs); run this script again"; exit 1; fi

# 4. The winner on validation into the store (once: a shipped version is never replaced); then the test
#    evaluation and the report, whose targets are measured on what the store holds.
if [[ $EXPORT == 1 && ! -f $STORE/fashion-mnist/$VERSION/manifest.json ]]; then
  "${ERDE[@]}" export "$("$PY" -m erde.compare winner --runs "$RUNS")" --store "$STORE" --name fashion-mnist \
    --version "$VERSION"
fi
shipped=()
[[ -f $STORE/fashion-mnist/$VERSION/manifest.json ]] && shipped=(--shipped "$STORE/fashion-mnist/$VERSION")
"$PY" -m erde.compare report --runs "$RUNS" --teacher "$TEACHER" --out "$REPORT" --title "$TITLE" --main "$best" kd \
  "${shipped[@]}"
echo "$(date +%T) finished: $REPORT/$TITLE.md"
