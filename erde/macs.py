"""Measured multiply-accumulates per exit (torch's FLOP counter, MACs = FLOPs / 2)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from erde.nets import EarlyExitResNet


def _count_macs(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops()) // 2


@torch.no_grad()
def macs_per_exit(model: EarlyExitResNet) -> list[int]:
    """Cumulative MACs to answer at each exit for one image: stages 1..i plus heads 1..i.

    Heads of exits that did not answer still ran (the rule needs their entropy), so they count.
    """
    cfg = model.config
    was_training = model.training
    model.eval()
    x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    cumulative, total = [], 0
    for i in range(model.num_exits):
        total += _count_macs(model.stage, i, x)
        x = model.stage(i, x)
        total += _count_macs(model.exit, i, x)
        cumulative.append(total)
    model.train(was_training)
    return cumulative
