"""Label-free accuracy estimation (issue 19): Average Thresholded Confidence per exit and operating point.

ATC (Garg et al., ICLR 2022) fits, on labelled source data, a threshold t on a confidence score so
that the share of source images scoring above t equals the source accuracy; on unlabelled target
data the share above t estimates the target accuracy. Here the score is the negative entropy of the
answering exit, and the early-exit classifier at θ is a different classifier for every θ and exit,
so t is fitted per calibration point and per exit, on the images of the validation split that
answer there: an answer at exit i under θ counts as "likely right" when its entropy is below
t_i(θ). The serving side averages these indicators over live replies (service/engine/drift.py,
docs/budgets.md).

The thresholds are stored in the artifact's manifest under `atc`, aligned with the points of
`calibration.json`: `python -m erde.confidence model_store/NAME/VERSION` adds them to an existing
artifact from its own validation split (the manifest lists the sha256 of the other files, not its
own, so they stay verified); `erde export` writes them with every new artifact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from erde.calibrate import CalibrationCurve, ExitOutputs, exit_outputs
from erde.data import load_dataset, train_val_split
from erde.exits import exit_taken
from erde.store import MANIFEST, read_artifact

MIN_ANSWERS = 20  # fewer validation answers than this at an exit: use the exit's threshold over all images
METHOD = "ATC-NE per exit and operating point, fitted on the validation split"


def _atc(entropy: np.ndarray, correct: np.ndarray) -> float:
    """The entropy below which the share of images equals their accuracy."""
    return float(np.quantile(entropy, correct.mean()))


def fit_atc(outputs: ExitOutputs, curve: CalibrationCurve) -> dict[str, Any]:
    """Per calibration point, per exit, the ATC threshold on the answering exit's entropy."""
    n_exits = outputs.entropy.shape[1]
    correct = outputs.prediction == outputs.labels[:, None]  # (N, exits)
    overall = [_atc(outputs.entropy[:, i], correct[:, i]) for i in range(n_exits)]
    rows = np.arange(len(outputs.labels))
    thresholds = []
    for point in curve.points:
        taken = exit_taken(outputs.entropy, point.threshold)
        entropy, right = outputs.entropy[rows, taken], correct[rows, taken]
        thresholds.append([round(_atc(entropy[taken == i], right[taken == i]), 6)
                           if np.count_nonzero(taken == i) >= MIN_ANSWERS else round(overall[i], 6)
                           for i in range(n_exits)])
    return {"method": METHOD, "samples": len(rows), "min_answers": MIN_ANSWERS, "thresholds": thresholds}


def add_to_artifact(path: Path) -> dict[str, Any]:
    """Fit the thresholds on the artifact's own validation split and write them into its manifest."""
    art = read_artifact(path)
    training = art.manifest["training"]
    data_dir = Path(training["data_dir"]) if training.get("data_dir") else None
    full = load_dataset(training["dataset"], "train", data_dir, image_size=art.spec.size, image_mode=art.spec.mode)
    _, val = train_val_split(full, training["val_fraction"], training["seed"])
    atc = fit_atc(exit_outputs(art.model, val), art.calibration)
    manifest = {**art.manifest, "atc": atc}
    (Path(path) / MANIFEST).write_text(json.dumps(manifest, indent=2))
    read_artifact(path)  # still verifies
    return atc


def main() -> None:
    parser = argparse.ArgumentParser(description="add ATC thresholds (label-free accuracy estimation) to artifacts")
    parser.add_argument("artifacts", nargs="+", type=Path)
    for path in parser.parse_args().artifacts:
        atc = add_to_artifact(path)
        print(f"{path}: {len(atc['thresholds'])} points, {atc['samples']} validation images")


if __name__ == "__main__":
    main()
