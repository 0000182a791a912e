"""The training loop's GPU path on the CPU: no host sync per step, channels_last and torch.compile
give a finished run, and resume survives a change of those options and a kill between the renames."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

import erde.train
from erde.losses import LossConfig
from erde.runs import TrainConfig, load_trained
from erde.train import train


def tiny(out: Path, **options) -> TrainConfig:
    defaults = {"arch": "tiny", "dataset": "synthetic", "epochs": 2, "batch_size": 32, "threads": 1}
    return TrainConfig(out_dir=str(out), **{**defaults, **options})


def _count_reads(monkeypatch) -> dict[str, int]:
    """Count every read of a tensor's value by the host (on a GPU each one waits for the device)."""
    counts = {"reads": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_reads_from_the_device_do_not_grow_with_the_steps(tmp_path, monkeypatch) -> None:
    reads = []
    for batches in (2, 12):  # 12 < POSTFIX_EVERY: the bar never reads inside these epochs
        counts = _count_reads(monkeypatch)
        train(tiny(tmp_path / f"b{batches}", max_train_batches=batches, loss=LossConfig(kind="ce")))
        monkeypatch.undo()
        reads.append(counts["reads"])
    assert reads[0] == reads[1] > 0


@pytest.mark.parametrize("options", [{}, {"channels_last": True}, {"channels_last": True, "compile": True}])
def test_channels_last_and_compile_give_a_finished_run(tmp_path, monkeypatch, options) -> None:
    # Inductor's C++ build takes minutes on a loaded CPU; the eager backend still traces the forward passes
    # with dynamo, so the loop runs the compiled functions (the GPU session exercises inductor itself).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    out = train(tiny(tmp_path / "run", **options))
    cfg, model, state = load_trained(out)
    assert (cfg.channels_last, cfg.compile) == (options.get("channels_last", False), options.get("compile", False))
    assert [h["epoch"] for h in state["history"]] == [1, 2] and "ce" in state["history"][-1]
    assert all(0 <= a <= 1 for a in state["history"][-1]["val_acc"])
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 4)
    assert (out / "log.txt").read_text().count("val_acc") == 2


_original_save = erde.train.save_checkpoint


def _die_after_epoch(monkeypatch, epoch: int, between_renames: bool = False) -> None:
    """Make the next training stop right after `epoch`'s checkpoint (optionally in the middle of writing it)."""

    def save_then_die(out, model, opt, gen, state) -> None:
        previous = (out / "state.json").read_text() if (out / "state.json").is_file() else None
        _original_save(out, model, opt, gen, state)
        if state["epoch"] == epoch:
            if between_renames:  # the checkpoint renamed, state.json not yet: the old one is still in place
                (out / "state.json.tmp").write_text(json.dumps(state, indent=2))
                (out / "state.json").write_text(previous)
            raise KeyboardInterrupt

    monkeypatch.setattr(erde.train, "save_checkpoint", save_then_die)


def test_resume_with_other_runtime_options_finishes_the_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    _die_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "run", epochs=3))
    monkeypatch.setattr(erde.train, "save_checkpoint", _original_save)
    train(tiny(tmp_path / "run", epochs=99, lr=9.0, channels_last=True, compile=True), resume=True)
    cfg, _, state = load_trained(tmp_path / "run")
    assert (cfg.epochs, cfg.lr) == (3, 0.1)  # what to train comes from the run's config.json...
    assert cfg.channels_last and cfg.compile  # ...how to run it from the resuming command
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]


def test_a_kill_between_the_checkpoint_renames_resumes_exactly(tmp_path, monkeypatch) -> None:
    straight = train(tiny(tmp_path / "straight", epochs=3))
    _die_after_epoch(monkeypatch, 2, between_renames=True)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "killed", epochs=3))
    monkeypatch.setattr(erde.train, "save_checkpoint", _original_save)
    assert json.loads((tmp_path / "killed" / "state.json").read_text())["epoch"] == 1  # behind the checkpoint
    train(tiny(tmp_path / "killed", epochs=3), resume=True)
    _, a, _ = load_trained(straight)
    _, b, state = load_trained(tmp_path / "killed")
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-6), name
