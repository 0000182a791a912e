"""What shadow passes cost (issue 19; docs/budgets.md): closed-loop throughput with them on (the defaults)
and off (ERDE_DRIFT_SHADOW_FRACTION=0), side by side in one run.

Two servers on the shipped store, wrk (one thread) at concurrency 1, 16 and 64, both models at budgets 0.25
and 1.0, `--rounds` interleaved rounds of `--seconds` each; medians, their ratio, and the MACs the server
with shadows spent on them as a share of its answers' MACs over the same runs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

from bench.common import STORE, table
from bench.load import launch, lua, require_wrk, server_port, stop, write_bodies, wrk_with_cpu
from erde.artifact import list_versions
from erde.store import read_artifact

MODELS = ("fashion-mnist", "fashion-mnist-teacher")
BUDGETS = ("0.25", "1.0")
CONCURRENCY = (1, 16, 64)


def macs(port: int, model: str) -> tuple[float, float]:
    """(shadow MACs, answers' MACs) the server has counted for `model`."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text

    def total(name: str) -> float:
        found = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, re.M)
        return float(found[1]) if found else 0.0
    return total("erde_shadow_macs_total"), total("erde_macs_total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "reports" / "shadow-cost.md")
    args = parser.parse_args()
    require_wrk()
    tmp = Path(tempfile.mkdtemp(prefix="erde-shadow-cost-"))
    env = {**os.environ, "ERDE_STORE": str(STORE), "ERDE_HOST": "127.0.0.1", "ERDE_ACCESS_LOG": "false"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    servers = {}
    for mode, fraction in (("on", None), ("off", "0")):
        port = server_port()
        extra = {} if fraction is None else {"ERDE_DRIFT_SHADOW_FRACTION": fraction}
        servers[mode] = port, launch([sys.executable, "-m", "service"], port, {**env, **extra}, tmp / f"{mode}.log",
                                     120)[0]
    rows = []
    try:
        for model in MODELS:
            art = read_artifact(STORE / model / list_versions(STORE)[model][-1])
            for budget in BUDGETS:
                script = lua(tmp, write_bodies(tmp, {"budget": budget, "model": model}, art.spec.size),
                             f"{model}-{budget}", 200_000)
                for concurrency in CONCURRENCY:
                    rates: dict[str, list[float]] = {"on": [], "off": []}
                    shadow_start, answer_start = macs(servers["on"][0], model)
                    for _ in range(args.rounds):
                        for mode, (port, proc) in servers.items():
                            rates[mode].append(wrk_with_cpu(proc.pid, port, script, concurrency, args.seconds)["rps"])
                    shadow_end, answer_end = macs(servers["on"][0], model)
                    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
                    share = (shadow_end - shadow_start) / max(answer_end - answer_start, 1.0)
                    rows.append([model, budget, concurrency, f"{on:,.0f}", f"{off:,.0f}", f"{on / off:.2f}",
                                 f"{share:.1%}"])
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
    finally:
        for _, proc in servers.values():
            stop(proc)
    report = "\n".join([
        "# What shadow passes cost (issue 19)", "",
        f"`python -m bench.shadow_cost --rounds {args.rounds} --seconds {args.seconds:g}`: two servers on the shipped "
        "store, shadow passes on (the defaults: ERDE_DRIFT_SHADOW_FRACTION 0.15, ERDE_DRIFT_SHADOW_CPU 0.25) and off "
        "(ERDE_DRIFT_SHADOW_FRACTION=0), wrk one thread on the same two cores, interleaved rounds, medians. The last "
        "column is what the server with shadows spent on them, as a share of its answers' MACs over the same runs "
        "(docs/budgets.md).", "",
        table(["model", "budget", "concurrency", "requests/s, shadows on", "off", "on ÷ off",
               "shadow MACs ÷ answers' MACs"], rows), ""])
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
