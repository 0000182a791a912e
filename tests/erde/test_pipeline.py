"""The whole method on synthetic data: teacher -> ERDE student -> calibrate -> export -> read back."""

import json

import pytest
import torch

import erde.train
from erde.curve import CalibrationCurve
from erde.data import iterate_batches, load_dataset
from erde.runs import TrainConfig, load_trained
from erde.store import read_artifact
from erde.train import train


def test_artifact_predicts_exactly_like_the_trained_run(tiny_pipeline) -> None:
    _, trained, _ = load_trained(tiny_pipeline.student_run)
    art = read_artifact(tiny_pipeline.student_artifact)
    x, _ = next(iterate_batches(load_dataset("synthetic", "test"), 64, shuffle=False))
    with torch.inference_mode():
        for a, b in zip(trained.forward_all(x), art.model.forward_all(x), strict=True):
            assert torch.equal(a, b)


def test_artifact_carries_what_the_service_needs(tiny_pipeline) -> None:
    art = read_artifact(tiny_pipeline.student_artifact)
    m = art.manifest
    assert m["training"]["loss"]["kind"] == "erde" and m["training"]["teacher"] == str(tiny_pipeline.teacher_artifact)
    assert m["macs_per_exit"] == art.calibration.macs_per_exit and len(m["macs_per_exit"]) == 3
    assert [r["budget"] for r in m["test_metrics"]["budgets"]] == [1.0, 0.75, 0.5, 0.35, 0.25, 0.15]
    calibration = json.loads((tiny_pipeline.student_run / "calibration.json").read_text())
    assert CalibrationCurve.from_dict(calibration).points == art.calibration.points
    assert "Model card: student v1" in (tiny_pipeline.student_artifact / "MODEL_CARD.md").read_text()


def test_training_learns_the_synthetic_task(tiny_pipeline) -> None:
    art = read_artifact(tiny_pipeline.teacher_artifact)
    assert art.manifest["test_metrics"]["full_depth_accuracy"] > 0.6  # 4 classes: chance is 0.25


def test_resume_continues_to_the_same_weights(tmp_path, monkeypatch) -> None:
    def cfg(out: str) -> TrainConfig:
        return TrainConfig(out_dir=str(tmp_path / out), arch="tiny", dataset="synthetic", epochs=2,
                           batch_size=128, threads=1)

    train(cfg("straight"))
    original = erde.train.save_checkpoint

    def save_then_die(*args, **kwargs) -> None:  # the process is killed right after epoch 1's checkpoint
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(erde.train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("resumed"))
    monkeypatch.setattr(erde.train, "save_checkpoint", original)
    train(cfg("resumed"), resume=True)
    _, a, _ = load_trained(tmp_path / "straight")
    _, b, _ = load_trained(tmp_path / "resumed")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-6), name
    history = json.loads((tmp_path / "resumed" / "state.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_refuses_to_overwrite_a_run_or_resume_nothing(tmp_path) -> None:
    cfg = TrainConfig(out_dir=str(tmp_path / "r"), arch="tiny", dataset="synthetic", epochs=1, threads=1)
    with pytest.raises(ValueError, match="nothing to resume"):
        train(cfg, resume=True)
    train(cfg)
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg)


def test_export_measures_latency_per_exit_into_manifest_and_card(tiny_pipeline) -> None:
    art = read_artifact(tiny_pipeline.student_artifact)
    latency = art.manifest["exit_latency"]
    assert sorted(latency["ms"], key=int) == ["1", "32"] and latency["threads"] == 1
    for times in latency["ms"].values():
        assert len(times) == 3 and all(t > 0 for t in times)
    assert latency["ms"]["32"][-1] > latency["ms"]["1"][-1]  # 32 images cost more than one, loaded machine or not
    assert "cores" in latency["machine"] and latency["statistic"].startswith("median of")
    card = (tiny_pipeline.student_artifact / "MODEL_CARD.md").read_text()
    assert "## Latency per exit" in card and f"| 0 | {art.macs_per_exit[0] / art.macs_per_exit[-1]:.3f} | " in card
