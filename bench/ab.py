"""Before and after, side by side: two versions of the service (git revisions, or the working tree),
or one version under two settings, served at once and measured with wrk in interleaved rounds.

Each side runs `python -m service` from its own checkout (`git archive` of the revision into
.bench/ab/<sha>/, or the working tree for "."), on the same model store. Every round measures every
(budget, concurrency) cell on both sides one after the other, so drift in the machine's load falls
on both; each cell prints one number per round.

Usage: .venv/bin/python -m bench.ab BEFORE AFTER [--rounds 2] [--seconds 5] [--concurrency 1 64]
           [--budgets full 0.25] [--env-before K=V ...] [--env-after K=V ...]
e.g.   .venv/bin/python -m bench.ab 4d9015f 4a23b7b                      (thread -> process, section 1)
       .venv/bin/python -m bench.ab . . --env-after ERDE_WORKERS=2        (one worker -> two)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import STORE, default_artifact, table
from bench.load import ROOT, launch, lua, require_wrk, server_port, stop, write_bodies, wrk

CHECKOUTS = ROOT / ".bench" / "ab"


def checkout(revision: str) -> Path:
    """The working tree for ".", else the revision's files extracted once under .bench/ab/<sha>/."""
    if revision == ".":
        return ROOT
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    folder = CHECKOUTS / sha[:12]
    if not folder.is_dir():
        CHECKOUTS.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}.", dir=CHECKOUTS))  # renamed once complete
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
        partial.rename(folder)
    return folder


def settings(pairs: list[str]) -> dict[str, str]:
    try:
        return dict(pair.split("=", 1) for pair in pairs)
    except ValueError:
        raise SystemExit(f"--env-before/--env-after take KEY=VALUE, got {pairs}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="git revision, or '.' for the working tree")
    parser.add_argument("after", help="git revision, or '.' for the working tree")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--budgets", nargs="+", default=["full", "0.25"], help="'full' is threshold=0")
    parser.add_argument("--env-before", nargs="*", default=[], metavar="K=V")
    parser.add_argument("--env-after", nargs="*", default=[], metavar="K=V")
    args = parser.parse_args()
    require_wrk()
    art = default_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="erde-ab-"))
    base = {**os.environ, "ERDE_STORE": str(STORE.resolve()), "ERDE_DEFAULT_MODEL": art.name,
            "ERDE_HOST": "127.0.0.1"}
    base.pop("PROMETHEUS_MULTIPROC_DIR", None)
    sides = {"before": (checkout(args.before), settings(args.env_before)),
             "after": (checkout(args.after), settings(args.env_after))}
    scripts = {b: lua(tmp, write_bodies(tmp, {"threshold": "0"} if b == "full" else {"budget": b}, art.spec.size),
                      f"b{b}", 10_000_000) for b in args.budgets}
    servers, ports = {}, {}
    try:
        for side, (folder, extra) in sides.items():
            ports[side] = server_port()
            env = {**base, **extra, "PYTHONPATH": str(folder)}  # the checkout's erde/ and service/
            servers[side], _ = launch([sys.executable, "-m", "service"], ports[side], env, tmp / f"{side}.log", 180,
                                      cwd=folder)
        results: dict[tuple[str, int, str], list[dict]] = {}
        for _ in range(args.rounds):
            for budget in args.budgets:
                for concurrency in args.concurrency:
                    for side in sides:
                        results.setdefault((budget, concurrency, side), []).append(
                            wrk(ports[side], scripts[budget], concurrency, args.seconds))
    finally:
        for proc in servers.values():
            stop(proc)

    def cell(budget: str, concurrency: int, side: str, latency: bool = False) -> str:
        runs = results[budget, concurrency, side]
        if latency:
            return ", ".join(f"{r['p50']:.2f} / {r['p99']:.2f}" for r in runs)
        return " / ".join(f"{r['ok_rps']:,.0f}" for r in runs)

    rows = [[b, c, cell(b, c, "before"), cell(b, c, "after"), cell(b, c, "before", True), cell(b, c, "after", True)]
            for b in args.budgets for c in args.concurrency]
    print(f"# Before ({args.before} {' '.join(args.env_before)}) and after ({args.after} {' '.join(args.env_after)}), "
          f"{art.name}/{art.version}, wrk 1 thread, {args.seconds:g} s per cell, {args.rounds} interleaved rounds "
          "(one number per round; successful replies per second)\n")
    print(table(["budget", "concurrency", "before req/s", "after req/s", "before p50 / p99 ms", "after p50 / p99 ms"],
                rows))


if __name__ == "__main__":
    main()
