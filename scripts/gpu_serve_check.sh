#!/usr/bin/env bash
# The prepared GPU check of issue 21, in one command that finishes within 8 minutes on a GPU machine and
# writes its report (gpu.md) into the folder it is given, or $OUT when that is set.
#
# Here, before:  bash scripts/gpu_serve_check.sh --prepare
#   copies the Fashion-MNIST files into .gpu-carry/ (git ignores it; the device has no dataset and no
#   network), as scripts/gpu_experiment.sh does.
# The device tool:  run(command="bash scripts/gpu_serve_check.sh", carry=[".gpu-carry"], timeout_s=540)
# Here, after:   cp <files_at>/gpu.md reports/gpu.md
#
# On the device: python3 with its own torch (2.11), numpy, safetensors and Pillow (matplotlib's); the exits
# and engine parts need nothing else. The HTTP part runs only where the service's dependencies (fastapi, uvicorn, Pillow)
# import, and the report says why when it does not.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
if [[ ${1:-} == --prepare ]]; then
  mkdir -p "$CARRY/fashion-mnist"
  cp -u /usr/share/datasets/fashion-mnist/t10k-*-ubyte.gz "$CARRY/fashion-mnist/"
  du -sh "$CARRY"
  exit 0
fi
out="${1:-${OUT:-}}"
if [[ -z $out ]]; then
  echo "usage: scripts/gpu_serve_check.sh OUT_DIR (or set OUT), or --prepare" >&2
  exit 2
fi
mkdir -p "$out"
python="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
args=(--out "$out/gpu.md" --device "${ERDE_DEVICE:-cuda}")
[[ ! -d $CARRY/fashion-mnist ]] || args+=(--data-dir "$CARRY/fashion-mnist")
"$python" -c "import numpy, safetensors, PIL, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  | tee "$out/environment.txt"
timeout 480 "$python" -m bench.gpu_check "${args[@]}" 2>&1 | tee "$out/gpu_check.log"
