"""Shared fixtures: a tiny trained teacher and ERDE student on synthetic data, built once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from erde.export import export_run
from erde.losses import LossConfig
from erde.runs import TrainConfig
from erde.train import train


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
