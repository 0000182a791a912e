import math

import pytest
import torch
import torch.nn.functional as F

from erde.losses import LossConfig, distillation_loss, entropy, entropy_term, kd_loss


def test_entropy_bounds() -> None:
    assert entropy(torch.zeros(1, 10)).item() == pytest.approx(math.log(10), rel=1e-5)
    assert entropy(torch.tensor([[100.0, 0, 0]])).item() < 1e-6


def test_kd_has_t_squared_scaling() -> None:
    torch.manual_seed(0)
    s, t = [torch.randn(8, 5)], [torch.randn(8, 5)]
    for temp in (1.0, 2.0, 4.0):
        manual = F.kl_div(F.log_softmax(s[0] / temp, -1), F.log_softmax(t[0] / temp, -1), log_target=True,
                          reduction="batchmean") * temp**2
        assert kd_loss(s, t, temp).item() == pytest.approx(manual.item(), rel=1e-5)


def test_kd_is_masked_to_teacher_correct_samples() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3])
    teacher = [torch.eye(4)[[0, 1, 3, 2]] * 5]  # right on samples 0, 1; wrong on 2, 3
    student = [torch.randn(4, 4)]
    base, _ = distillation_loss(LossConfig(kind="erde", alpha=0, gamma=0), student, labels, teacher)
    moved = [student[0].clone()]
    moved[0][2:] += torch.randn(2, 4) * 10  # changing teacher-wrong rows must not change the KD term
    after, _ = distillation_loss(LossConfig(kind="erde", alpha=0, gamma=0), moved, labels, teacher)
    assert after.item() == pytest.approx(base.item(), rel=1e-6)
    moved[0][0, 1] += 10  # changing a teacher-right row must
    changed, _ = distillation_loss(LossConfig(kind="erde", alpha=0, gamma=0), moved, labels, teacher)
    assert changed.item() != pytest.approx(base.item(), rel=1e-3)
    plain_kd, _ = distillation_loss(LossConfig(kind="kd", alpha=0), moved, labels, teacher)
    assert plain_kd.item() != pytest.approx(changed.item(), rel=1e-3)  # KD baseline uses every sample


def test_entropy_term_falls_as_student_entropy_rises_on_teacher_wrong_samples() -> None:
    wrong = [torch.tensor([True, False]), torch.tensor([True, False])]
    values = []
    for sharpness in (10.0, 3.0, 1.0, 0.0):
        s = torch.tensor([[sharpness, 0.0, 0.0], [5.0, 0.0, 0.0]])
        values.append(entropy_term([s, s], wrong).item())
    assert values == sorted(values, reverse=True)
    assert values[-1] == pytest.approx(-1.0, abs=1e-6)  # uniform: -H/log K = -1


def test_entropy_term_ignores_teacher_right_samples_and_the_last_exit() -> None:
    sharp, flat = torch.tensor([[9.0, 0, 0]]), torch.zeros(1, 3)
    right = [torch.tensor([False])] * 2
    assert entropy_term([sharp, sharp], right).item() == 0.0
    wrong = [torch.tensor([True])] * 2
    assert entropy_term([sharp, flat], wrong).item() == entropy_term([sharp, sharp], wrong).item()
    assert entropy_term([sharp, flat], wrong, include_last=True).item() < entropy_term([sharp, flat], wrong).item()


def test_ce_baseline_needs_no_teacher_and_others_do() -> None:
    s, y = [torch.randn(4, 3, requires_grad=True)], torch.tensor([0, 1, 2, 0])
    loss, parts = distillation_loss(LossConfig(kind="ce"), s, y)
    loss.backward()
    assert set(parts) == {"ce"}
    with pytest.raises(ValueError, match="needs teacher"):
        distillation_loss(LossConfig(kind="erde"), s, y)
    with pytest.raises(ValueError, match="loss kind"):
        LossConfig(kind="mse")
