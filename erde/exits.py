"""The exit rule, in one place: calibration simulates it and the serving loop runs it.

At exit i the entropy of the softmax is c_i = -sum_k p_k log p_k (nats). A row answers at the
first exit where c_i < θ or where its cap (`max_exit`, else the last exit) is reached, so the last
exit always answers, θ = 0 runs to the end and θ above log K stops at the first exit.

Entropies are float64, computed in numpy from the network's float32 logits, by calibration and by
serving alike: a θ stored in a calibration curve means the same thing wherever it is compared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the rule itself is numpy: the server, which imports no torch, runs it too
    import torch


def exit_scores(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (B, K) and entropies (B,), float64, from logits (B, K).

    In numpy: serving runs this once per stage on a few small rows, where numpy's ops cost less
    than torch's per-op dispatch. Logits on a device are copied to the host here, the one sync a stage
    needs, so the rule is the same float64 arithmetic wherever the network ran.
    """
    z = logits.detach().cpu().double().numpy()  # (B, K)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    probs = np.exp(logp)
    return probs, -(probs * logp).sum(axis=1)


def last_exit(max_exit: int | None, num_exits: int) -> int:
    """The cap a row runs under: its `max_exit` (None: no cap), never past the network's last exit."""
    return num_exits - 1 if max_exit is None else min(max_exit, num_exits - 1)


def stops(entropy: np.ndarray, threshold: np.ndarray | float, cap: np.ndarray | int, index: int) -> np.ndarray:
    """Whether each row answers at exit `index`: its entropy is below θ, or it has reached its cap.

    `cap` comes from `last_exit`, so every row stops at the last exit at the latest.
    """
    return (entropy < threshold) | (cap <= index)


def exit_taken(entropies: np.ndarray, threshold: float, max_exit: int | None = None) -> np.ndarray:
    """The exit each row answers at, given every exit's entropy (N, n_exits): the rule run on all exits."""
    cap = last_exit(max_exit, entropies.shape[1])
    stopped = np.stack([stops(entropies[:, i], threshold, cap, i) for i in range(entropies.shape[1])], axis=1)
    return stopped.argmax(axis=1)  # the first True; the cap's column is all True
