"""The one exit rule shared by calibration and serving: entropies, the per-exit decision, the exit taken."""

import math

import numpy as np
import pytest
import torch

from erde.exits import exit_scores, exit_taken, last_exit, stops


def test_scores_are_float64_softmax_and_entropy() -> None:
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)) * 3
    probs, ent = exit_scores(logits)
    assert probs.dtype == ent.dtype == np.float64 and probs.shape == (6, 10) and ent.shape == (6,)
    ref = torch.log_softmax(logits.double(), -1)
    np.testing.assert_allclose(probs, ref.exp().numpy(), rtol=1e-12)
    np.testing.assert_allclose(ent, -(ref.exp() * ref).sum(-1).numpy(), rtol=1e-12)


def test_scores_at_the_extremes() -> None:
    _, ent = exit_scores(torch.tensor([[0.0] * 10, [1000.0] + [0.0] * 9, [-1000.0] * 10]))
    assert ent[0] == pytest.approx(math.log(10)) and ent[2] == pytest.approx(math.log(10))
    assert 0 <= ent[1] < 1e-300  # certain, with no overflow


def test_exit_rule_is_strict_and_capped() -> None:
    ent = np.array([[0.5, 0.1, 0.0], [0.2, 0.9, 0.0], [0.9, 0.9, 0.9]])
    assert exit_taken(ent, 0.5).tolist() == [1, 0, 2]  # 0.5 is not below 0.5
    assert exit_taken(ent, 0.5, max_exit=0).tolist() == [0, 0, 0]
    assert exit_taken(ent, 0.0, max_exit=1).tolist() == [1, 1, 1]
    assert exit_taken(ent, 0.0, max_exit=7).tolist() == [2, 2, 2]  # a cap past the end is the end
    assert exit_taken(ent[:0], 0.5).tolist() == []


def test_per_row_thresholds_and_caps_as_the_serving_loop_uses_them() -> None:
    ent = np.array([0.3, 0.3, 0.3, 0.3])
    theta = np.array([0.2, 0.4, 0.2, 0.0])
    cap = np.array([last_exit(None, 3), 2, last_exit(1, 3), last_exit(9, 3)])
    assert stops(ent, theta, cap, 0).tolist() == [False, True, False, False]
    assert stops(ent, theta, cap, 1).tolist() == [False, True, True, False]
    assert stops(ent, theta, cap, 2).tolist() == [True, True, True, True]  # the last exit always answers
