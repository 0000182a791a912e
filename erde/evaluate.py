"""Test-split evaluation: accuracy against MACs at budgets, exit histograms, table and plots.

The θ for each budget comes from the artifact's calibration (validation split); the test split
only measures what that θ gives, so no choice is ever made on test data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from erde.calibrate import ExitOutputs, exit_outputs, simulate
from erde.curve import CalibrationCurve
from erde.data import TensorData, load_dataset
from erde.nets import EarlyExitResNet
from erde.store import Artifact, read_artifact

DEFAULT_BUDGETS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15)


def measure_test_split(model: EarlyExitResNet, curve: CalibrationCurve, test: TensorData,
                       budgets: tuple[float, ...] | list[float] = DEFAULT_BUDGETS) -> dict[str, Any]:
    """Per-exit accuracy, full depth, and each budget's operating point measured on `test`."""
    outputs = exit_outputs(model, test)
    return metrics_from_outputs(outputs, curve, budgets)


def metrics_from_outputs(outputs: ExitOutputs, curve: CalibrationCurve,
                         budgets: tuple[float, ...] | list[float]) -> dict[str, Any]:
    macs = curve.macs_per_exit
    per_exit = (outputs.prediction == outputs.labels[:, None]).mean(0)
    rows = []
    for budget in budgets:
        point, clamped = curve.choose(budget)
        measured = simulate(outputs, macs, point.threshold)
        rows.append({"budget": budget, "threshold": round(point.threshold, 6), "clamped": clamped,
                     "accuracy": round(measured.accuracy, 6), "macs_fraction": round(measured.macs_fraction, 6),
                     "mean_macs": round(measured.macs_fraction * macs[-1]), "exit_histogram": measured.exit_histogram,
                     "val_accuracy": round(point.accuracy, 6)})
    return {"samples": len(outputs.labels), "exit_accuracy": [round(float(a), 6) for a in per_exit],
            "full_depth_accuracy": round(float(per_exit[-1]), 6), "full_macs": macs[-1], "budgets": rows}


def test_split_of(artifact: Artifact, data_dir: str | None = None) -> TensorData:
    training = artifact.manifest.get("training", {})
    dataset = training.get("dataset", "fashion-mnist")
    folder = data_dir or training.get("data_dir")
    return load_dataset(dataset, "test", Path(folder) if folder else None,
                        image_size=artifact.spec.size, image_mode=artifact.spec.mode)


def _curve_on_test(outputs: ExitOutputs, curve: CalibrationCurve) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy vs MACs on test for every calibrated θ (the Pareto view for the plot)."""
    pts = [simulate(outputs, curve.macs_per_exit, p.threshold) for p in curve.points]
    macs = np.array([p.macs_fraction * curve.macs_per_exit[-1] for p in pts]) / 1e6
    acc = np.array([p.accuracy for p in pts]) * 100
    order = np.argsort(macs)
    return macs[order], acc[order]


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | budget | θ | accuracy % | MMACs/image | MACs fraction | exit histogram % |",
             "|---|---|---|---|---|---|---|"]
    for label, m in results.items():
        full_hist = " / ".join(["0"] * (len(m["exit_accuracy"]) - 1) + ["100"])
        lines.append(f"| {label} | full depth | 0 | {m['full_depth_accuracy'] * 100:.2f} | "
                     f"{m['full_macs'] / 1e6:.2f} | 1.000 | {full_hist} |")
        for r in m["budgets"]:
            hist = " / ".join(f"{h * 100:.1f}" for h in r["exit_histogram"])
            note = " (cheapest)" if r["clamped"] else ""
            lines.append(f"| {label} | {r['budget']}{note} | {r['threshold']:.4f} | {r['accuracy'] * 100:.2f} | "
                         f"{r['mean_macs'] / 1e6:.2f} | {r['macs_fraction']:.3f} | {hist} |")
    return "\n".join(lines)


def _plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], results: dict[str, dict[str, Any]], out: Path,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (macs, acc) in curves.items():
        ax.plot(macs, acc, label=label, lw=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("mean MMACs per image (log scale)")
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(max(50.0, min(a.min() for _, a in curves.values()) - 1), None)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{title}: accuracy vs compute (θ swept)")
    fig.tight_layout()
    fig.savefig(out / f"{title}.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3), squeeze=False)
    for ax, (label, m) in zip(axes[0], results.items(), strict=True):
        n = len(m["exit_accuracy"])
        for j, r in enumerate(m["budgets"]):
            ax.bar(np.arange(n) + j * 0.8 / len(m["budgets"]), np.array(r["exit_histogram"]) * 100,
                   width=0.8 / len(m["budgets"]), label=str(r["budget"]))
        ax.set_title(label, fontsize=9)
        ax.set_xticks(np.arange(n) + 0.4, [f"exit {i}" for i in range(n)])
        ax.set_ylabel("% of images")
    axes[0][-1].legend(title="budget", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{title}-exits.png", dpi=110)
    plt.close(fig)


def evaluate_artifacts(paths: list[Path], out: Path, data_dir: str | None = None,
                       budgets: list[float] | tuple[float, ...] = DEFAULT_BUDGETS, title: str = "evaluation") -> str:
    """Evaluate artifacts on their test split; writes `<title>.md`, `<title>.png`, `<title>-exits.png`."""
    if any(not 0 < b <= 1 for b in budgets):
        raise ValueError("budgets must be in (0, 1]")
    out.mkdir(parents=True, exist_ok=True)
    results, curves = {}, {}
    for path in paths:
        art = read_artifact(path)
        label = f"{art.name}/{art.version}"
        outputs = exit_outputs(art.model, test_split_of(art, data_dir))
        results[label] = metrics_from_outputs(outputs, art.calibration, budgets)
        curves[label] = _curve_on_test(outputs, art.calibration)
    table = markdown_table(results)
    command = " ".join(["erde evaluate", *map(str, paths), "--out", str(out), "--title", title,
                        *(["--data-dir", data_dir] if data_dir else []),
                        *(["--budgets", *map(str, budgets)] if tuple(budgets) != DEFAULT_BUDGETS else [])])
    (out / f"{title}.md").write_text(f"# {title}\n\nWritten by `{command}`.\n\n{table}\n\n"
                                     f"![accuracy vs MACs]({title}.png)\n\n![exit histograms]({title}-exits.png)\n")
    _plot(curves, results, out, title)
    return table
