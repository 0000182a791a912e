#!/usr/bin/env bash
# Issue 14's whole experiment (scripts/fashion_mnist_v2.sh) on a lent GPU machine, in one command.
#
# Here, before:  bash scripts/gpu_experiment.sh --prepare
#   copies the Fashion-MNIST files into .gpu-carry/ (git ignores it; the device has no dataset and no
#   network), with the parts of an earlier call's results when they are given: --prepare <files_at>.
# The device tool:  run(command="bash scripts/gpu_experiment.sh", carry=[".gpu-carry"], timeout_s=600)
# Here, after:   bash scripts/gpu_experiment.sh --unpack <files_at>
#   puts runs/v2 and the report back into this tree; then `scripts/fashion_mnist_v2.sh` here finishes
#   what is left (resuming on the CPU if the GPU ran out of time), reports, and exports
#   model_store/fashion-mnist/2 with its latency measured on this CPU.
#
# On the device: python3 with torch 2.11 (CUDA), numpy, safetensors, tqdm and matplotlib (the image's
# package list); erde needs nothing else for training (fastapi and the service are not imported), and
# a missing one is named by the preflight below before any device time goes to training. matplotlib
# alone is optional (the report is written without its figures). The run stops itself after DEADLINE
# seconds and packs what it has (checkpoints of unfinished runs included), so a second call, or the CPU
# here, continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
RUNS=runs/v2
PACK=results.tar.gz  # shipped back in parts under 16 MiB (the device tool's limit per file)

if [[ ${1:-} == --prepare ]]; then
  mkdir -p "$CARRY/fashion-mnist"
  cp -u /usr/share/datasets/fashion-mnist/*-ubyte.gz "$CARRY/fashion-mnist/"
  rm -f "$CARRY"/$PACK.part-*
  [[ -z ${2:-} ]] || cp "$2"/$PACK.part-* "$CARRY/"
  du -sh "$CARRY"
  exit 0
fi
if [[ ${1:-} == --unpack ]]; then
  cat "$2"/$PACK.part-* | tar xzf -
  cp "$2"/log.txt "$RUNS/gpu-log.txt" 2>/dev/null || true
  echo "unpacked into $RUNS and reports/; continue with: scripts/fashion_mnist_v2.sh"
  exit 0
fi

probe() {  # probe <name> <options...>: trains the teacher 2 epochs of 60 steps, prints the second's seconds
  local out=$RUNS/probe/$1; shift
  rm -rf "$out"
  python3 -m erde.cli train-teacher --arch "${TEACHER_ARCH:-resnet20}" --dataset "${DATASET:-fashion-mnist}" \
    --epochs 2 --max-train-batches 60 --batch-size 256 --lr 0.2 --threads 2 --out "$out" "$@" > "$out.log" 2>&1
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['history'][1]['seconds'])" "$out/state.json"
}

choose_gpu_options() {  # writes $RUNS/probe/choice: the options every run of the experiment gets
  mkdir -p "$RUNS/probe"
  if [[ ${PROBE:-1} == 0 ]]; then echo "${EXTRA:-}" > "$RUNS/probe/choice"; return; fi
  [[ ! -f $RUNS/probe/choice ]] || return 0
  # channels_last, and torch.compile on top, are used only where they pay: compile must make the step
  # 30% faster, since every lane spends about a minute compiling.
  local plain last compiled
  plain=$(probe plain) && last=$(probe channels-last --channels-last) || return 1
  compiled=$(probe compiled --channels-last --compile || echo 1e9)
  echo "probe, seconds for 60 steps + validation: plain $plain, channels-last $last, +compile $compiled"
  python3 - "$plain" "$last" "$compiled" > "$RUNS/probe/choice" <<'PY'
import sys
plain, last, compiled = map(float, sys.argv[1:])
best = "--channels-last" if last <= plain else ""
print("--channels-last --compile" if compiled <= 0.7 * min(plain, last) else best)
PY
}

pack() {  # the runs and the report into $OUT, in parts; finished runs without their checkpoints
  local skip=(--exclude="$RUNS/probe/*/checkpoint.safetensors") run
  for run in "$RUNS"/*/; do
    if [[ -f $run/weights.safetensors ]]; then skip+=(--exclude="${run%/}/checkpoint.safetensors"); fi
  done
  shopt -s nullglob
  tar czf - "${skip[@]}" "$RUNS" reports/fashion-mnist-v2* | split -b 15m - "$OUT/$PACK.part-"
  ls -la "$OUT"
}

device_main() {
  local started=$SECONDS status deadline=${DEADLINE:-540}  # seconds before packing; a call may take 600
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  REQUIRE_CUDA=${REQUIRE_CUDA:-1} python3 - <<'PY' || return 1
import importlib.util, os, sys
need, optional = ("torch", "numpy", "safetensors", "tqdm"), ("matplotlib",)
missing = [m for m in need + optional if importlib.util.find_spec(m) is None]
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}; "
      f"missing packages: {missing or 'none'}")
if set(missing) & set(need):
    sys.exit("cannot train here: carry the missing packages as wheels (the device README says how)")
if os.environ["REQUIRE_CUDA"] == "1" and not torch.cuda.is_available():
    sys.exit("no GPU visible to torch")
PY
  # (Each step checks itself: this function runs where `set -e` does not reach, in a pipeline to tee.)
  # The dataset where erde looks by default, so that no run config names a machine's folder.
  local data=/usr/share/datasets/fashion-mnist
  mkdir -p "$data" && cp -u "$CARRY"/fashion-mnist/*-ubyte.gz "$data/" || return 1
  # A fresh machine continues from an earlier call's results, when they were carried.
  if [[ ! -d $RUNS ]] && compgen -G "$CARRY/$PACK.part-*" > /dev/null; then
    cat "$CARRY"/$PACK.part-* | tar xzf - || return 1
  fi
  choose_gpu_options || return 1
  echo "GPU options: $(cat "$RUNS/probe/choice"); $((SECONDS - started)) s so far"
  timeout --signal=TERM --kill-after=30 $((deadline - (SECONDS - started))) \
    env ERDE="python3 -m erde.cli" PY=python3 LANES="${LANES:-8}" THREADS="${THREADS:-2}" \
    EXTRA="$(cat "$RUNS/probe/choice")" EXPORT=0 bash scripts/fashion_mnist_v2.sh && status=0 || status=$?
  echo "experiment exit status $status after $((SECONDS - started)) s"
  pack
  if (( status != 0 )); then echo "UNFINISHED (status $status): call again, or unpack here and go on on the CPU"; fi
  return "$status"
}

: "${OUT:?run this on the device machine (it sets OUT), or pass --prepare / --unpack here}"
set +e
device_main 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
exit $(( status == 0 ? 0 : 3 ))
