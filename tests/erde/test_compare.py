"""erde.compare on tiny runs: choices read validation only (seed 0), the report holds every setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erde.compare import choose, finished_runs, main, validation_score, winner
from erde.export import export_run
from erde.losses import LossConfig
from erde.runs import TrainConfig, calibrate_run
from erde.train import train


@pytest.fixture(scope="module")
def runs(tiny_pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kd and erde-g05 with two seeds each, ce with one, on the synthetic set (a few steps each)."""
    root = tmp_path_factory.mktemp("v2")
    settings = {"kd": LossConfig(kind="kd"), "erde-g05": LossConfig(kind="erde", gamma=0.5), "ce": LossConfig("ce")}
    for name, loss in settings.items():
        for seed in (0, 1) if name != "ce" else (0,):
            run = train(TrainConfig(out_dir=str(root / f"{name}-s{seed}"), arch="tiny", dataset="synthetic",
                                    epochs=2, batch_size=64, lr=0.05, threads=1, seed=seed, loss=loss,
                                    teacher=None if name == "ce" else str(tiny_pipeline.teacher_artifact)))
            calibrate_run(run, points=41)
    train(TrainConfig(out_dir=str(root / "unfinished-s0"), arch="tiny", dataset="synthetic", epochs=1,
                      threads=1, max_train_batches=1))  # trained but never calibrated: not a candidate
    return root


def test_choices_use_seed_zero_on_validation_only(runs: Path) -> None:
    assert set(finished_runs(runs)) == {"kd", "erde-g05", "ce"}
    scores = {s: validation_score(runs / f"{s}-s0") for s in ("kd", "erde-g05")}
    assert choose(runs, ["kd", "erde-g05"]) == max(scores, key=scores.get)
    best = winner(runs)
    setting = best.name.rsplit("-s", 1)[0]
    assert validation_score(runs / f"{setting}-s0") == max(validation_score(runs / f"{s}-s0")
                                                           for s in ("kd", "erde-g05", "ce"))
    assert validation_score(best) == max(validation_score(r) for r in finished_runs(runs)[setting].values())
    with pytest.raises(ValueError, match="no finished, calibrated seed-0 run for missing"):
        choose(runs, ["kd", "missing"])


def test_report_has_the_headline_comparison_and_every_setting(runs: Path, tiny_pipeline, tmp_path: Path) -> None:
    code = main(["report", "--runs", str(runs), "--teacher", str(tiny_pipeline.teacher_artifact),
                 "--out", str(tmp_path), "--title", "v2", "--main", "erde-g05", "kd"])
    assert code == 0
    text = (tmp_path / "v2.md").read_text()
    assert "## erde-g05 against kd (2 and 2 seeds), test split" in text
    headline = [line for line in text.splitlines() if line.startswith("| 0.5 |")]
    assert len(headline) == 1 and " ± " in headline[0] and "[" in headline[0]
    for setting in ("| ce |", "| kd |", "| erde-g05 |"):
        assert setting in text
    assert "| teacher test accuracy ≥ 94.5% |" in text and (tmp_path / "v2.png").stat().st_size > 1000
    assert json.loads((runs / "kd-s0" / "state.json").read_text())["history"][-1]["device"] == "cpu"
    assert "Training ran on:\ncpu" in text


def test_the_targets_are_measured_on_the_shipped_artifact_and_a_different_pick_is_shown(
        runs: Path, tiny_pipeline, tmp_path: Path) -> None:
    pick = winner(runs)
    other = next(r for r in finished_runs(runs)[pick.name.rsplit("-s", 1)[0]].values() if r != pick)
    for shipped_run, version in ((pick, "1"), (other, "2")):
        export_run(shipped_run, tmp_path / "store", "toy", version, latency_repeats=0)
    common = ["report", "--runs", str(runs), "--teacher", str(tiny_pipeline.teacher_artifact), "--out",
              str(tmp_path), "--title", "v2", "--main", "erde-g05", "kd", "--shipped"]

    assert main([*common, str(tmp_path / "store" / "toy" / "1")]) == 0
    text = (tmp_path / "v2.md").read_text()
    assert f"## Targets (`{tmp_path / 'store' / 'toy' / '1'}`, run `{pick.name}`)" in text
    assert text.count("| teacher test accuracy ≥ 94.5% |") == 1 and "now picks" not in text

    assert main([*common, str(tmp_path / "store" / "toy" / "2")]) == 0
    text = (tmp_path / "v2.md").read_text()
    assert f"run `{other.name}`)" in text and f"now picks `{pick.name}`" in text
    assert text.count("| teacher test accuracy ≥ 94.5% |") == 2  # the shipped run's targets, then the pick's
