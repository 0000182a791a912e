"""Fitting the label-free accuracy estimator (erde/estimator.py) on an artifact's own validation split.

`python -m erde.confidence model_store/NAME/VERSION` adds it to an existing artifact; `erde export`
writes it with every new artifact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from erde.artifact import MANIFEST
from erde.calibrate import ExitOutputs, exit_outputs
from erde.curve import CalibrationCurve
from erde.data import load_dataset, train_val_split
from erde.exits import exit_taken
from erde.store import read_artifact

METHOD = "agreement with the last exit x ATC at the last exit, on shadow passes; fitted on the validation split"


def fit_estimator(outputs: ExitOutputs, curve: CalibrationCurve) -> dict[str, Any]:
    """The manifest's `estimator` for a curve, from every exit's outputs on the validation split."""
    last = outputs.prediction[:, -1]
    threshold = float(np.quantile(outputs.entropy[:, -1], np.mean(last == outputs.labels)))
    rows = np.arange(len(outputs.labels))
    disagree_right = []
    for point in curve.points:
        answer = outputs.prediction[rows, exit_taken(outputs.entropy, point.threshold)]
        differs = answer != last
        disagree_right.append(round(float(np.mean(answer[differs] == outputs.labels[differs])), 6)
                              if differs.any() else 0.0)
    return {"method": METHOD, "samples": len(rows), "last_threshold": round(threshold, 6),
            "disagree_right": disagree_right}


def add_to_artifact(path: Path) -> dict[str, Any]:
    """Fit the estimator on the artifact's own validation split and write it into its manifest."""
    art = read_artifact(path)
    training = art.manifest["training"]
    data_dir = Path(training["data_dir"]) if training.get("data_dir") else None
    full = load_dataset(training["dataset"], "train", data_dir, image_size=art.spec.size, image_mode=art.spec.mode)
    _, val = train_val_split(full, training["val_fraction"], training["seed"])
    fitted = fit_estimator(exit_outputs(art.model, val), art.calibration)
    manifest = {k: v for k, v in art.manifest.items() if k != "atc"}  # the estimator this one replaced
    (Path(path) / MANIFEST).write_text(json.dumps({**manifest, "estimator": fitted}, indent=2))
    read_artifact(path)  # still verifies
    return fitted


def main() -> None:
    parser = argparse.ArgumentParser(description="add the label-free accuracy estimator to artifacts")
    parser.add_argument("artifacts", nargs="+", type=Path)
    for path in parser.parse_args().artifacts:
        fitted = add_to_artifact(path)
        print(f"{path}: last exit's threshold {fitted['last_threshold']:.4f}, {fitted['samples']} validation images")


if __name__ == "__main__":
    main()
