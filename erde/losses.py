"""Losses for early-exit students: CE, exit-to-exit KD, and ERDE's entropy term.

Exits i = 1..n, student logits s_i, teacher logits t_i, temperature T, K classes, and
C_i the samples the teacher's exit i classifies correctly (DESIGN section 3):
    L_CE = mean_i CE(s_i, y)
    L_KD = mean_i T^2 KL(softmax(t_i/T) || softmax(s_i/T))      (over C_i only for ERDE)
    L_E  = mean over i < n and samples not in C_i of -H(softmax(s_i)) / log K
    ERDE = alpha L_CE + beta L_KD(C_i) + gamma L_E;  KD = alpha L_CE + beta L_KD(all);  CE = L_CE
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

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {self.kind!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError("alpha, beta and gamma must be non-negative")

    def to_dict(self) -> dict:
        return asdict(self)


def entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) per row: (B, K) -> (B,)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def ce_loss(student: list[Tensor], labels: Tensor) -> Tensor:
    return torch.stack([F.cross_entropy(s, labels) for s in student]).mean()


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values over mask; 0 (with gradient) when the mask is empty."""
    weight = mask.float()
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


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


def entropy_term(student: list[Tensor], wrong: list[Tensor], include_last: bool = False) -> Tensor:
    """L_E: minus the normalised entropy of the student where the teacher's exit is wrong."""
    exits = len(student) if include_last else len(student) - 1
    if exits == 0:
        return student[0].new_zeros(())
    log_k = math.log(student[0].shape[-1])
    terms = [_masked_mean(-entropy(student[i]) / log_k, wrong[i]) for i in range(exits)]
    return torch.stack(terms).mean()


def distillation_loss(cfg: LossConfig, student: list[Tensor], labels: Tensor,
                      teacher: list[Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
    """The loss `cfg.kind` selects, with its parts for logging."""
    l_ce = ce_loss(student, labels)
    if cfg.kind == "ce":
        return l_ce, {"ce": l_ce.item()}
    if teacher is None:
        raise ValueError(f"loss {cfg.kind!r} needs teacher logits")
    if cfg.kind == "kd":
        l_kd = kd_loss(student, teacher, cfg.temperature)
        return cfg.alpha * l_ce + cfg.beta * l_kd, {"ce": l_ce.item(), "kd": l_kd.item()}
    correct = [t.argmax(-1) == labels for t in teacher]
    l_kd = kd_loss(student, teacher, cfg.temperature, masks=correct)
    l_e = entropy_term(student, [~c for c in correct], cfg.entropy_last_exit)
    total = cfg.alpha * l_ce + cfg.beta * l_kd + cfg.gamma * l_e
    return total, {"ce": l_ce.item(), "kd": l_kd.item(), "ent": l_e.item()}
