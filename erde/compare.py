"""Compare a family of student runs (issue 14's v2 experiment): choose on validation, measure on
test, report mean ± std over seeds and paired-bootstrap differences, as markdown and plots.

Run folders are named `<setting>-s<seed>` side by side in one folder; a setting is one loss and
architecture (scripts/fashion_mnist_v2.sh lists them). Choices read only the runs' calibration
curves (the validation split) and only seed 0, so a setting's later seeds never change a choice;
the test split is read by `report` alone.

    python -m erde.compare choose --runs runs/v2 erde-g0 erde-g05 ...  # prints the best setting
    python -m erde.compare winner --runs runs/v2                        # prints the run folder to ship
    python -m erde.compare report --runs runs/v2 --teacher runs/v2/store/teacher/1 --out reports --title T
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from erde.calibrate import ExitOutputs, answers, exit_outputs
from erde.curve import CalibrationCurve
from erde.data import TensorData, load_dataset
from erde.evaluate import DEFAULT_BUDGETS, metrics_from_outputs
from erde.runs import TrainConfig, load_trained, read_calibration
from erde.stats import Interval, mean_std, paired_bootstrap
from erde.store import read_artifact

RUN_NAME = re.compile(r"^(?P<setting>.+)-s(?P<seed>\d+)$")
FULL = "full depth"  # the operating point θ = 0, beside the budgets


def finished_runs(root: Path) -> dict[str, dict[int, Path]]:
    """Setting -> seed -> run folder, for the runs that finished training and were calibrated."""
    found: dict[str, dict[int, Path]] = {}
    for run in sorted(Path(root).iterdir()):
        match = RUN_NAME.match(run.name)
        if match and (run / "weights.safetensors").is_file() and read_calibration(run) is not None:
            found.setdefault(match["setting"], {})[int(match["seed"])] = run
    return found


def validation_score(run: Path) -> float:
    """Mean calibrated validation accuracy over the report's budgets: the one number choices use."""
    curve = read_calibration(run)
    if curve is None:
        raise ValueError(f"{run} has no calibration.json; run 'erde calibrate {run}' first")
    return float(np.mean([curve.choose(b)[0].accuracy for b in DEFAULT_BUDGETS]))


def choose(root: Path, settings: list[str]) -> str:
    """The setting whose seed-0 run scores best on validation (the first listed wins a tie)."""
    runs = finished_runs(root)
    missing = [s for s in settings if 0 not in runs.get(s, {})]
    if missing:
        raise ValueError(f"no finished, calibrated seed-0 run for {', '.join(missing)} in {root}")
    return max(settings, key=lambda s: (validation_score(runs[s][0]), -settings.index(s)))


def winner(root: Path) -> Path:
    """The run to ship: the best setting on seed-0 validation, then its best seed on validation."""
    runs = finished_runs(root)
    if not runs:
        raise ValueError(f"no finished, calibrated runs in {root}")
    setting = choose(root, sorted(s for s in runs if 0 in runs[s]))
    return max(runs[setting].values(), key=validation_score)


@dataclass
class RunResult:
    setting: str
    seed: int
    cfg: TrainConfig
    val_score: float
    metrics: dict  # erde.evaluate.metrics_from_outputs on the test split
    correct: dict[str | float, np.ndarray]  # operating point (FULL or a budget) -> (N,) per-image correctness
    devices: list[str]  # where its epochs ran (history)
    macs: list[int]  # cumulative MACs per exit


def evaluate_run(setting: str, seed: int, run: Path, test: TensorData) -> RunResult:
    cfg, model, state = load_trained(run)
    curve: CalibrationCurve = read_calibration(run)  # type: ignore[assignment]  (finished_runs checked it)
    outputs: ExitOutputs = exit_outputs(model, test)
    metrics = metrics_from_outputs(outputs, curve, DEFAULT_BUDGETS)
    correct: dict[str | float, np.ndarray] = {FULL: answers(outputs, 0.0)[1]}
    for row in metrics["budgets"]:
        correct[row["budget"]] = answers(outputs, row["threshold"])[1]
    devices = sorted({h.get("device", "cpu") for h in state["history"]})
    return RunResult(setting, seed, cfg, validation_score(run), metrics, correct, devices, curve.macs_per_exit)


def accuracy_at(result: RunResult, point: str | float) -> float:
    return float(result.correct[point].mean())


def macs_at(result: RunResult, point: str | float) -> float:
    if point == FULL:
        return 1.0
    return next(r["macs_fraction"] for r in result.metrics["budgets"] if r["budget"] == point)


def _pm(values: list[float], scale: float = 100, digits: int = 2) -> str:
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if len(values) > 1 else "")


def _interval(i: Interval) -> str:
    return f"{i.mean * 100:+.2f} [{i.low * 100:+.2f}, {i.high * 100:+.2f}]"


def _stack(results: list[RunResult], point: str | float) -> np.ndarray:
    return np.stack([r.correct[point] for r in results])  # (seeds, images)


POINTS: list[str | float] = [FULL, *DEFAULT_BUDGETS]


def main_table(a: list[RunResult], b: list[RunResult], a_name: str, b_name: str) -> str:
    """Per operating point: each group's mean ± std over seeds, and the paired bootstrap of a - b."""
    lines = [f"| operating point | {b_name} accuracy % | {a_name} accuracy % | MACs fraction ({a_name}) | "
             f"{a_name} - {b_name}, points [95% interval] | what the interval shows |", "|---|---|---|---|---|---|"]
    for point in POINTS:
        interval = paired_bootstrap(_stack(a, point), _stack(b, point))
        lines.append(f"| {point} | {_pm([accuracy_at(r, point) for r in b])} | "
                     f"{_pm([accuracy_at(r, point) for r in a])} | {_pm([macs_at(r, point) for r in a], 1, 3)} | "
                     f"{_interval(interval)} | {interval.verdict(a_name, b_name)} |")
    return "\n".join(lines)


def settings_table(groups: dict[str, list[RunResult]], baseline: list[RunResult], baseline_name: str) -> str:
    """Every setting: its method, seeds, validation score (seed 0), test accuracy at each point."""
    head = " | ".join(str(p) for p in POINTS)
    lines = [f"| setting | method | arch | seeds | validation score % (seed 0) | test % at: {head} | "
             f"vs {baseline_name} at full depth | at 0.5 |", "|" + "---|" * (7 + len(POINTS))]
    for setting, results in groups.items():
        seed0 = next(r for r in results if r.seed == 0)
        cells = " | ".join(_pm([accuracy_at(r, p) for r in results]) for p in POINTS)
        versus = "— | —" if results is baseline else " | ".join(
            _interval(paired_bootstrap(_stack(results, p), _stack(baseline, p))) for p in (FULL, 0.5))
        lines.append(f"| {setting} | {seed0.cfg.loss.describe()} | {seed0.cfg.arch} | {len(results)} | "
                     f"{seed0.val_score * 100:.2f} | {cells} | {versus} |")
    return "\n".join(lines)


def targets(teacher_acc: float, teacher_macs: int, shipped: RunResult) -> str:
    """The issue's targets against the shipped run and the teacher (the time target is `make bench`'s)."""
    full = accuracy_at(shipped, FULL)
    at_half = accuracy_at(shipped, 0.5)
    tenth = [r for r in shipped.metrics["budgets"] if r["mean_macs"] * 10 <= teacher_macs]
    best_tenth = max((r["accuracy"] for r in tenth), default=float("nan"))
    rows = [("teacher test accuracy ≥ 94.5%", f"{teacher_acc * 100:.2f}%", teacher_acc >= 0.945),
            ("student at full depth ≥ 93.5%", f"{full * 100:.2f}%", full >= 0.935),
            ("student MACs ≤ 1/5 of the teacher's", f"{shipped.macs[-1] / teacher_macs:.3f}",
             shipped.macs[-1] * 5 <= teacher_macs),
            ("budget 0.5 within 0.3 points of full depth", f"{(at_half - full) * 100:+.2f} points",
             full - at_half <= 0.003),
            ("stretch: within 0.5 points of the teacher at ≤ 1/10 of its MACs (report budgets)",
             f"{best_tenth * 100:.2f}%" if tenth else "no budget that cheap", bool(tenth)
             and teacher_acc - best_tenth <= 0.005)]
    return "\n".join(["| target | measured | met |", "|---|---|---|",
                      *(f"| {t} | {v} | {'yes' if ok else 'no'} |" for t, v, ok in rows)])


def _plot(groups: dict[str, list[RunResult]], main: list[str], teacher: tuple[float, float], out: Path,
          title: str) -> list[str]:
    """Accuracy vs MACs at the report's points (mean ± std over seeds), and the validation scores."""
    try:
        import matplotlib
    except ImportError:  # the report stays complete without its figures
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setting in main:
        results = groups[setting]
        full_macs = results[0].metrics["full_macs"]
        x = [np.mean([macs_at(r, p) for r in results]) * full_macs / 1e6 for p in POINTS]
        stats = [mean_std([accuracy_at(r, p) * 100 for r in results]) for p in POINTS]
        ax.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                    label=f"{setting} ({len(results)} seed{'s' if len(results) > 1 else ''})")
    ax.plot([teacher[1] / 1e6], [teacher[0] * 100], "k*", markersize=12, label="teacher, full depth")
    ax.set_xscale("log")
    ax.set_xlabel("mean MMACs per image (log scale)")
    ax.set_ylabel("test accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}: test accuracy at the report's budgets")
    fig.tight_layout()
    fig.savefig(out / f"{title}.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(groups) + 1.2))
    names = list(groups)
    scores = [next(r for r in groups[s] if r.seed == 0).val_score * 100 for s in names]
    ax.barh(names, scores, color="tab:blue")
    ax.set_xlim(min(scores) - 0.5, max(scores) + 0.2)
    ax.set_xlabel("validation score % (mean calibrated accuracy over the budgets, seed 0)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / f"{title}-settings.png", dpi=110)
    plt.close(fig)
    return [f"![test accuracy at the budgets]({title}.png)", f"![validation scores]({title}-settings.png)"]


def run_of(groups: dict[str, list[RunResult]], run: Path) -> RunResult:
    name = RUN_NAME.match(run.name)
    found = [r for r in groups.get(name["setting"], []) if r.seed == int(name["seed"])] if name else []
    if not found:
        raise ValueError(f"{run} is not among the finished runs")
    return found[0]


def shipped_section(groups: dict[str, list[RunResult]], root: Path, shipped_path: Path | None,
                    teacher_acc: float, teacher_macs: int) -> str:
    """The targets against the shipped artifact (its manifest names its run), or against the rule's
    pick (`winner`) when nothing is shipped yet; when the two differ, both, and the reason."""
    chosen = winner(root)
    shipped_run = Path(read_artifact(shipped_path).manifest["training"]["out_dir"]) if shipped_path else chosen
    shipped = run_of(groups, shipped_run)
    where = f"`{shipped_path}`, run `{shipped_run.name}`" if shipped_path else f"the run to ship: `{chosen.name}`"
    text = f"## Targets ({where})\n\n{targets(teacher_acc, teacher_macs, shipped)}\n"
    if chosen.name == shipped_run.name:
        return text
    pick = run_of(groups, chosen)
    seeds = [r.val_score * 100 for r in groups[pick.setting]]
    return text + f"""
The rule (best setting on seed-0 validation, then its best seed on validation) now picks `{chosen.name}`:
validation score {pick.val_score * 100:.2f}% against {shipped.val_score * 100:.2f}% for the shipped run (the
{len(seeds)} seeds of `{pick.setting}` span {max(seeds) - min(seeds):.2f} points on validation). The shipped
artifact was exported by the same rule when its seed was the only one finished, and is kept, not replaced:
a choice between seeds of one setting is a choice of noise, and the service's reports and benchmarks
measure the shipped artifact as it is. The tables above hold every seed (mean ± std), so no claim rests
on either run. The rule's pick against the same targets:

{targets(teacher_acc, teacher_macs, pick)}
"""


def report(root: Path, teacher_path: Path, out: Path, title: str, main: list[str],
           shipped_path: Path | None = None) -> str:
    """Evaluate every finished run on the test split and write `<out>/<title>.md` (and plots).

    `main` names the two settings of the headline comparison, [erde, kd]: mean ± std over their
    seeds and the paired bootstrap of their difference at every operating point. `shipped_path`,
    the artifact in the store, is what the targets are measured on.
    """
    out.mkdir(parents=True, exist_ok=True)
    runs = finished_runs(root)
    if any(s not in runs for s in main):
        raise ValueError(f"the main comparison needs finished runs of {' and '.join(main)} in {root}")
    first = next(iter(runs[main[0]].values()))
    cfg, _, _ = load_trained(first)
    test = load_dataset(cfg.dataset, "test", Path(cfg.data_dir) if cfg.data_dir else None,
                        image_size=cfg.image_size, image_mode=cfg.image_mode)
    groups = {s: [evaluate_run(s, seed, run, test) for seed, run in sorted(seeds.items())]
              for s, seeds in sorted(runs.items()) if 0 in seeds}
    teacher = read_artifact(teacher_path)
    t_out = exit_outputs(teacher.model, test)
    t_acc = [float(a) for a in (t_out.prediction == t_out.labels[:, None]).mean(0)]
    t_hist = teacher.manifest["training"]["history"]
    devices = sorted({d for results in groups.values() for r in results for d in r.devices}
                     | {h.get("device", "cpu") for h in t_hist})
    erde_name, kd_name = main
    figures = _plot(groups, [*main, *(s for s in ("ce",) if s in groups)], (t_acc[-1], teacher.macs_per_exit[-1]),
                    out, title)
    text = f"""# {title}

Generated by `scripts/fashion_mnist_v2.sh` (`python -m erde.compare report`) on
{time.strftime("%Y-%m-%d", time.gmtime())}, from the runs in `{root}`; {len(test)} test images. Training ran on:
{", ".join(devices)} (each run's history records where each epoch ran).
Every choice was made on the validation split (seed 0's calibration curve: the mean calibrated accuracy over
the budgets {", ".join(map(str, DEFAULT_BUDGETS))}); the test split only measures.

## Teacher

`{teacher.manifest.get("arch")}`, {len(t_hist)} epochs (batch {teacher.manifest["training"]["batch_size"]},
lr {teacher.manifest["training"]["lr"]}): test accuracy per exit {" / ".join(f"{a * 100:.2f}" for a in t_acc)} %,
cumulative MMACs {" / ".join(f"{m / 1e6:.2f}" for m in teacher.macs_per_exit)}; best validation accuracy
(last exit) {max(h["val_acc"][-1] for h in t_hist) * 100:.2f}% at epoch
{1 + int(np.argmax([h["val_acc"][-1] for h in t_hist]))}.

## {erde_name} against {kd_name} ({len(groups[erde_name])} and {len(groups[kd_name])} seeds), test split

Accuracy: mean ± std over seeds. The difference: paired bootstrap over the test images (the same images
for both), seeds resampled within each setting, 5000 resamples, 95% percentile interval. "{erde_name} >
{kd_name}" is written only where the whole interval is above zero.

{main_table(groups[erde_name], groups[kd_name], erde_name, kd_name)}

## Every setting (seed 0 chooses; test accuracy mean ± std where there are several seeds)

The entropy-term ablations vary one option of erde-g05 (γ = 0.5, T = 4) each: the γ sweep, T = 2,
`entropy_replaces` (L_E instead of CE on the teacher-wrong samples) and a γ ramp. The last columns:
paired bootstrap of the setting minus {kd_name}, points [95% interval].

{settings_table(groups, groups[kd_name], kd_name)}

{shipped_section(groups, root, shipped_path, t_acc[-1], teacher.macs_per_exit[-1])}
{chr(10).join(figures)}
"""
    (out / f"{title}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erde.compare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("choose", help="print the setting whose seed-0 run scores best on validation")
    p.add_argument("--runs", required=True)
    p.add_argument("settings", nargs="+")
    p = sub.add_parser("winner", help="print the run folder to ship (best setting, then best seed, on validation)")
    p.add_argument("--runs", required=True)
    p = sub.add_parser("report", help="evaluate every finished run on test; write <out>/<title>.md and plots")
    p.add_argument("--runs", required=True)
    p.add_argument("--teacher", required=True, help="the teacher's artifact folder")
    p.add_argument("--out", default="reports")
    p.add_argument("--title", default="fashion-mnist-v2")
    p.add_argument("--main", nargs=2, required=True, metavar=("ERDE", "KD"), help="the headline pair of settings")
    p.add_argument("--shipped", help="the shipped artifact folder (default: the rule's pick, not yet shipped)")
    args = parser.parse_args(argv)
    try:
        if args.command == "choose":
            print(choose(Path(args.runs), args.settings))
        elif args.command == "winner":
            print(winner(Path(args.runs)))
        else:
            report(Path(args.runs), Path(args.teacher), Path(args.out), args.title, args.main,
                   Path(args.shipped) if args.shipped else None)
            print(f"report written: {Path(args.out) / args.title}.md")
    except (ValueError, FileNotFoundError) as exc:
        print(f"erde.compare {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
