"""Shared fixtures, built once per session: a tiny trained teacher and ERDE student on synthetic data, and the
shipped models' exits on the Fashion-MNIST test split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from erde.calibrate import ExitOutputs, exit_outputs
from erde.data import load_fashion_mnist
from erde.export import export_run
from erde.losses import LossConfig
from erde.runs import TrainConfig
from erde.store import Artifact, read_artifact
from erde.train import train

MODEL_STORE = Path(__file__).resolve().parents[1] / "model_store"


@dataclass
class TinyPipeline:
    root: Path
    teacher_run: Path
    student_run: Path
    teacher_artifact: Path
    student_artifact: Path


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> TinyPipeline:
    """teacher -> export -> ERDE student -> export, on the synthetic set, tiny nets, seconds on CPU."""
    root = tmp_path_factory.mktemp("pipeline")
    teacher_run = train(TrainConfig(out_dir=str(root / "teacher"), arch="tiny", dataset="synthetic", epochs=3,
                                    batch_size=32, lr=0.05, threads=1))
    store = root / "store"
    teacher_artifact = export_run(teacher_run, store, "teacher", "1")
    student_run = train(TrainConfig(out_dir=str(root / "student"), arch="tiny", dataset="synthetic", epochs=3,
                                    batch_size=32, lr=0.05, threads=1, teacher=str(teacher_artifact),
                                    loss=LossConfig(kind="erde", gamma=0.5)))
    student_artifact = export_run(student_run, store, "student", "1")
    return TinyPipeline(root, teacher_run, student_run, teacher_artifact, student_artifact)


@pytest.fixture(scope="session")
def shipped_on_test_split() -> Callable[[str], tuple[Artifact, ExitOutputs]]:
    """A shipped model ("name/version", read and verified) and every exit's output on the Fashion-MNIST test
    split, computed once per model: the card test and the estimator test both need the teacher's (12 s)."""
    found: dict[str, tuple[Artifact, ExitOutputs]] = {}

    def shipped(name: str) -> tuple[Artifact, ExitOutputs]:
        if name not in found:
            art = read_artifact(MODEL_STORE / name)
            found[name] = art, exit_outputs(art.model, load_fashion_mnist("test"))
        return found[name]

    return shipped
