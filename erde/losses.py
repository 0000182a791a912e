"""Losses for early-exit students: CE, exit-to-exit KD, and ERDE's entropy term.

Exits i = 1..n, student logits s_i, teacher logits t_i, temperature T, K classes, and
C_i the samples the teacher's exit i classifies correctly (docs/design.md §3.4):
    L_CE = mean_i CE(s_i, y)
    L_KD = mean_i T^2 KL(softmax(t_i/T) || softmax(s_i/T))      (over C_i only for ERDE)
    L_E  = mean over i < n and samples not in C_i of -H(softmax(s_i)) / log K
    ERDE = alpha L_CE + beta L_KD(C_i) + gamma L_E;  KD = alpha L_CE + beta L_KD(all);  CE = L_CE

Ablations (issue 14), all options of `LossConfig`: γ and T; `entropy_replaces`, where L_E takes
the place of CE on the teacher-wrong samples of the exits it applies to (CE then runs over C_i
only there, and the two no longer pull against each other on one sample); and `gamma_ramp`,
a linear warm-up of γ over the first part of training (the loop passes its progress).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_KINDS = ("erde", "kd", "ce")


@dataclass(frozen=True)
class LossConfig:
    """Distillation loss options; the defaults are the ones chosen on validation."""

    kind: str = "erde"  # "erde", "kd" (plain distillation) or "ce" (no teacher)
    temperature: float = 4.0  # T: softens both distributions in KD
    alpha: float = 1.0  # weight of the cross-entropy term
    beta: float = 1.0  # weight of the KD term
    gamma: float = 0.5  # weight of the entropy term (ERDE only)
    entropy_last_exit: bool = False  # ablation: apply L_E at the last exit too
    entropy_replaces: bool = False  # ablation: on teacher-wrong samples, L_E instead of CE (where L_E applies)
    gamma_ramp: float = 0.0  # ablation: γ rises linearly from 0 over this fraction of training (0: constant)

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {self.kind!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError("alpha, beta and gamma must be non-negative")
        if not 0 <= self.gamma_ramp <= 1:
            raise ValueError(f"gamma_ramp is a fraction of training in [0, 1], got {self.gamma_ramp}")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The method in words, with every option that differs from plain ERDE (model cards, reports)."""
        if self.kind == "ce":
            return "cross-entropy at every exit, no teacher"
        weights = f"T={self.temperature}, α={self.alpha}, β={self.beta}"
        if self.kind == "kd":
            return f"knowledge distillation ({weights})"
        extras = [f"γ ramped over {self.gamma_ramp:.0%} of training"] if self.gamma_ramp else []
        extras += ["L_E in place of CE on teacher-wrong samples"] if self.entropy_replaces else []
        extras += ["L_E at the last exit too"] if self.entropy_last_exit else []
        return f"ERDE ({', '.join([weights, f'γ={self.gamma}', *extras])})"

    def gamma_at(self, progress: float) -> float:
        """γ at `progress` (0 at the first step, 1 at the end of training): the ramp, then γ."""
        if self.gamma_ramp == 0:
            return self.gamma
        return self.gamma * min(1.0, max(0.0, progress) / self.gamma_ramp)


def entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) per row: (B, K) -> (B,)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values over mask; 0 (with gradient) when the mask is empty."""
    weight = mask.float()
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def ce_loss(student: list[Tensor], labels: Tensor, masks: list[Tensor | None] | None = None) -> Tensor:
    """CE at every exit; `masks[i]` (when given and not None) restricts exit i to some samples."""
    terms = []
    for i, s in enumerate(student):
        mask = masks[i] if masks is not None else None
        if mask is None:
            terms.append(F.cross_entropy(s, labels))
        else:
            terms.append(_masked_mean(F.cross_entropy(s, labels, reduction="none"), mask))
    return torch.stack(terms).mean()


def kd_loss(student: list[Tensor], teacher: list[Tensor], temperature: float,
            masks: list[Tensor] | None = None) -> Tensor:
    """Exit-to-exit KD with T^2 scaling; `masks[i]` restricts exit i to some samples."""
    terms = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        log_ps = F.log_softmax(s / temperature, dim=-1)
        log_pt = F.log_softmax(t.detach() / temperature, dim=-1)
        per_sample = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature**2  # (B,)
        terms.append(per_sample.mean() if masks is None else _masked_mean(per_sample, masks[i]))
    return torch.stack(terms).mean()


def entropy_exits(num_exits: int, include_last: bool) -> int:
    """How many exits (from the first) L_E applies to: all but the last, or all."""
    return num_exits if include_last else num_exits - 1


def entropy_term(student: list[Tensor], wrong: list[Tensor], include_last: bool = False) -> Tensor:
    """L_E: minus the normalised entropy of the student where the teacher's exit is wrong."""
    exits = entropy_exits(len(student), include_last)
    if exits == 0:
        return student[0].new_zeros(())
    log_k = math.log(student[0].shape[-1])
    terms = [_masked_mean(-entropy(student[i]) / log_k, wrong[i]) for i in range(exits)]
    return torch.stack(terms).mean()


def distillation_loss(cfg: LossConfig, student: list[Tensor], labels: Tensor, teacher: list[Tensor] | None = None,
                      progress: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss `cfg.kind` selects, and its parts (detached, on the loss's device) for logging.

    `progress` (0 to 1 over training) drives the γ ramp. The parts stay tensors: reading them is
    a host sync, which the training loop does once per epoch, not once per step.
    """
    if cfg.kind == "ce":
        l_ce = ce_loss(student, labels)
        return l_ce, {"ce": l_ce.detach()}
    if teacher is None:
        raise ValueError(f"loss {cfg.kind!r} needs teacher logits")
    if cfg.kind == "kd":
        l_ce, l_kd = ce_loss(student, labels), kd_loss(student, teacher, cfg.temperature)
        return cfg.alpha * l_ce + cfg.beta * l_kd, {"ce": l_ce.detach(), "kd": l_kd.detach()}
    correct = [t.argmax(-1) == labels for t in teacher]
    replaced = entropy_exits(len(student), cfg.entropy_last_exit) if cfg.entropy_replaces else 0
    l_ce = ce_loss(student, labels, [c if i < replaced else None for i, c in enumerate(correct)])
    l_kd = kd_loss(student, teacher, cfg.temperature, masks=correct)
    l_e = entropy_term(student, [~c for c in correct], cfg.entropy_last_exit)
    total = cfg.alpha * l_ce + cfg.beta * l_kd + cfg.gamma_at(progress) * l_e
    return total, {"ce": l_ce.detach(), "kd": l_kd.detach(), "ent": l_e.detach()}
