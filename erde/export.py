"""Turn a finished run into a model_store artifact: calibrate, measure on test, write the card."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from erde.artifact import InputSpec
from erde.calibrate import exit_outputs
from erde.confidence import fit_estimator
from erde.data import load_dataset
from erde.evaluate import markdown_table, measure_test_split
from erde.latency import measure as measure_latency
from erde.macs import macs_per_exit
from erde.runs import CALIBRATION, TrainConfig, calibrate_run, load_run_data, load_trained, read_calibration
from erde.store import write_artifact


def model_card(name: str, version: str, cfg: TrainConfig, spec: InputSpec, classes: list[str],
               params: int, macs: list[int], metrics: dict[str, Any], history: list[dict[str, Any]],
               latency: dict[str, Any] | None = None) -> str:
    """A human-readable card; every number in it comes from the manifest it ships with."""
    train_minutes = sum(h["seconds"] for h in history) / 60
    method = cfg.loss.describe()
    exits = "\n".join(f"| {i} | {m / 1e6:.3f} | {m / macs[-1]:.3f} | {a * 100:.2f} |"
                      for i, (m, a) in enumerate(zip(macs, metrics["exit_accuracy"], strict=True)))
    return f"""# Model card: {name} v{version}

Early-exit {cfg.arch} ({params:,} parameters, {len(macs)} exits) trained on **{cfg.dataset}** with {method}.
{f"Teacher: the `{'/'.join(Path(cfg.teacher).parts[-2:])}` artifact." if cfg.teacher else ""}

- Input: {spec.mode} {spec.size}x{spec.size}, normalised with mean {list(spec.mean)} and std {list(spec.std)}.
- Classes ({len(classes)}): {", ".join(classes)}.
- Training: {cfg.epochs} epochs, batch {cfg.batch_size}, SGD lr {cfg.lr} cosine, weight decay {cfg.weight_decay},
  seed {cfg.seed}, validation {cfg.val_fraction:.0%} of the training split; {train_minutes:.1f} min in all.
- Exit rule: stop at the first exit whose softmax entropy is below θ; θ per budget from the
  validation-split calibration in `calibration.json`.

## MACs and accuracy per exit (test split, {metrics["samples"]} images; every image at that exit)

| exit | cumulative MMACs | fraction of full | accuracy % |
|---|---|---|---|
{exits}

{_latency_section(latency, macs) if latency else ""}## Budgets (test split)

{markdown_table({f"{name}/{version}": metrics})}

## Limits

Trained on {cfg.dataset} images only: other imagery (photos, other sizes or backgrounds) is out of
distribution and the calibrated accuracies do not hold for it. Expected accuracy is an average over
the test split, not a per-image guarantee.
"""


def _latency_section(latency: dict[str, Any], macs: list[int]) -> str:
    sizes = sorted(latency["ms"], key=int)
    header = " | ".join(f"ms at batch {b} | time fraction" for b in sizes)
    rows = "\n".join(f"| {i} | {m / macs[-1]:.3f} | " + " | ".join(
        f"{latency['ms'][b][i]:.3f} | {latency['ms'][b][i] / latency['ms'][b][-1]:.3f}" for b in sizes) + " |"
        for i, m in enumerate(macs))
    return f"""## Latency per exit (measured at export)

{latency["machine"]}; torch {latency["torch"]}, {latency["threads"]} thread(s), {latency["statistic"]}, the
network as served (BN folded, per-stage convolution backend).

| exit | MACs fraction | {header} |
|---|---|{"---|---|" * len(sizes)}
{rows}

"""


def export_run(run_dir: Path, store: Path, name: str, version: str, overwrite: bool = False,
               latency_repeats: int = 50) -> Path:
    """Calibrate (if not yet), evaluate on the test split, measure latency per exit on this machine
    (`latency_repeats` = 0 skips it), and write `<store>/<name>/<version>/`."""
    cfg, model, state = load_trained(run_dir)
    curve = read_calibration(run_dir) or calibrate_run(run_dir)
    macs = macs_per_exit(model)
    if curve.macs_per_exit != macs:
        raise ValueError(f"{Path(run_dir) / CALIBRATION} does not match this network's MACs; "
                         "run 'erde calibrate' again")
    spec = InputSpec.from_dict(state["input_spec"])
    test = load_dataset(cfg.dataset, "test", Path(cfg.data_dir) if cfg.data_dir else None,
                        image_size=spec.size, image_mode=spec.mode)
    metrics = measure_test_split(model, curve, test)
    params = sum(p.numel() for p in model.parameters())
    latency = measure_latency(model, latency_repeats) if latency_repeats > 0 else None
    metadata = {
        "arch": cfg.arch, "params": params, "full_macs": macs[-1],
        "training": {**cfg.to_dict(), "history": state["history"],
                     "minutes": round(sum(h["seconds"] for h in state["history"]) / 60, 2)},
        "test_metrics": metrics,
        "estimator": fit_estimator(exit_outputs(model, load_run_data(cfg).val), curve),  # erde/confidence.py
        **({"exit_latency": latency} if latency else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": {"torch": torch.__version__, "python": platform.python_version()},
    }
    card = model_card(name, version, cfg, spec, state["classes"], params, macs, metrics, state["history"], latency)
    return write_artifact(store, name, version, model, spec, state["classes"], curve, metadata, card, overwrite)
