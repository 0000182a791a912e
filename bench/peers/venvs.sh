#!/usr/bin/env bash
# One virtualenv per peer under .bench/peers/<peer>/, so the product's dependencies stay clean.
# A venv is (re)built only when it is missing or its requirements changed since it was built
# (a hash of the requirements is kept in .bench/peers/<peer>/.installed). Missing venvs are built
# nproc at a time. A peer whose install fails is reported and left out by bench/peers/run.py.
# Usage: bash bench/peers/venvs.sh [peer...]   (default: every bench/peers/requirements-<peer>.txt)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
ROOT=.bench/peers
JOBS=${JOBS:-$(nproc)}
peers=("$@")
if [ ${#peers[@]} -eq 0 ]; then
  for f in bench/peers/requirements-*.txt; do
    p=$(basename "$f" .txt); p=${p#requirements-}
    [ "$p" = common ] || peers+=("$p")
  done
fi

build() {
  local peer=$1 want=$2 venv=$ROOT/$1 started=$SECONDS
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  if ! { "$venv/bin/python" -m pip install --quiet --upgrade pip &&
         "$venv/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1 \
           -r "bench/peers/requirements-$peer.txt"; } > "$ROOT/$peer.install.log" 2>&1; then
    echo "venv $venv: pip install FAILED (the benchmark leaves $peer out); see $ROOT/$peer.install.log" >&2
    grep -v '^WARNING: Location' "$ROOT/$peer.install.log" | tail -5 >&2
    return 0
  fi
  "$venv/bin/python" -m pip freeze > "$venv/freeze.txt" 2>/dev/null
  echo "$want" > "$venv/.installed"
  echo "venv $venv: ready in $((SECONDS - started)) s"
}

mkdir -p "$ROOT"
running=0
for peer in "${peers[@]}"; do
  want=$(cat bench/peers/requirements-common.txt "bench/peers/requirements-$peer.txt" | sha256sum | cut -c1-16)
  if [ -f "$ROOT/$peer/.installed" ] && [ "$(cat "$ROOT/$peer/.installed")" = "$want" ]; then
    echo "venv $ROOT/$peer: up to date"
    continue
  fi
  echo "venv $ROOT/$peer: creating"
  if [ "$running" -ge "$JOBS" ]; then wait -n || true; running=$((running - 1)); fi
  build "$peer" "$want" &
  running=$((running + 1))
done
wait
