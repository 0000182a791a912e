import math

import pytest
import torch
import torch.nn.functional as F

from erde.losses import LOSS_KINDS, LossConfig, distillation_loss, entropy, entropy_term, kd_loss


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


@pytest.mark.parametrize(("ramp", "progress", "expected"), [
    (0.0, 0.0, 0.5), (0.0, 0.7, 0.5),  # no ramp: γ from the first step
    (0.2, 0.0, 0.0), (0.2, 0.1, 0.25), (0.2, 0.2, 0.5), (0.2, 1.0, 0.5),  # starts at 0, reaches γ at 20%
    (1.0, 0.5, 0.25), (1.0, 1.0, 0.5),
])
def test_gamma_ramp_starts_at_zero_and_reaches_gamma(ramp: float, progress: float, expected: float) -> None:
    assert LossConfig(gamma=0.5, gamma_ramp=ramp).gamma_at(progress) == pytest.approx(expected)


def test_gamma_ramp_scales_only_the_entropy_term() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3])
    teacher = [torch.eye(4)[[0, 1, 3, 2]] * 5] * 2  # wrong on samples 2 and 3
    student = [torch.randn(4, 4), torch.randn(4, 4)]
    ramped = LossConfig(gamma=0.8, gamma_ramp=0.5)
    start, parts = distillation_loss(ramped, student, labels, teacher, progress=0.0)
    assert start.item() == pytest.approx((parts["ce"] + parts["kd"]).item(), rel=1e-6)  # γ = 0 at the start
    middle, _ = distillation_loss(ramped, student, labels, teacher, progress=0.25)
    end, _ = distillation_loss(ramped, student, labels, teacher, progress=0.9)
    assert middle.item() == pytest.approx((parts["ce"] + parts["kd"] + 0.4 * parts["ent"]).item(), rel=1e-6)
    assert end.item() == pytest.approx((parts["ce"] + parts["kd"] + 0.8 * parts["ent"]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="gamma_ramp"):
        LossConfig(gamma_ramp=1.5)


def _wrong_row_moved(cfg: LossConfig, exit_index: int) -> tuple[float, float]:
    """The loss before and after changing the student's logits of a teacher-wrong row at one exit."""
    labels = torch.tensor([0, 1, 2])
    teacher = [torch.eye(3)[[0, 1, 0]] * 5] * 3  # every teacher exit is wrong on sample 2 only
    torch.manual_seed(1)
    student = [torch.randn(3, 3) for _ in range(3)]
    before, _ = distillation_loss(cfg, student, labels, teacher)
    moved = [s.clone() for s in student]
    moved[exit_index][2] = torch.tensor([0.0, 0.0, 6.0])  # confident and right: CE falls, entropy falls
    after, _ = distillation_loss(cfg, moved, labels, teacher)
    return before.item(), after.item()


def test_entropy_replaces_drops_ce_on_teacher_wrong_samples_where_the_entropy_term_applies() -> None:
    ce_only = {"alpha": 1.0, "beta": 0.0, "gamma": 0.0}
    before, after = _wrong_row_moved(LossConfig(entropy_replaces=True, **ce_only), 0)
    assert after == pytest.approx(before, rel=1e-6)  # exit 0: the wrong row has no CE any more
    before, after = _wrong_row_moved(LossConfig(entropy_replaces=True, **ce_only), 2)
    assert after < before  # the last exit keeps CE on every sample (L_E is off there)
    before, after = _wrong_row_moved(LossConfig(entropy_replaces=True, entropy_last_exit=True, **ce_only), 2)
    assert after == pytest.approx(before, rel=1e-6)  # ...unless L_E runs at the last exit too
    before, after = _wrong_row_moved(LossConfig(**ce_only), 0)
    assert after < before  # without the option, CE trains every sample


def test_ce_and_entropy_term_pull_against_each_other_on_a_teacher_wrong_sample() -> None:
    """Without `entropy_replaces` both act on the row; with it only L_E does, raising its entropy."""
    labels, teacher = torch.tensor([0]), [torch.tensor([[0.0, 5.0, 0.0]])] * 2  # the teacher is wrong
    for replaces, entropy_rises in ((False, False), (True, True)):
        s0 = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)  # confident and right
        cfg = LossConfig(alpha=1.0, beta=0.0, gamma=0.1, entropy_replaces=replaces)
        loss, _ = distillation_loss(cfg, [s0, torch.zeros(1, 3)], labels, teacher)
        loss.backward()
        stepped = (s0 - 0.5 * s0.grad).detach()
        assert (entropy(stepped) > entropy(s0.detach())).item() is entropy_rises  # weak γ: CE wins unless replaced


def test_loss_parts_are_detached_tensors_for_the_loop_to_sum_on_its_device() -> None:
    s = [torch.randn(4, 3, requires_grad=True)] * 2
    t, y = [torch.randn(4, 3)] * 2, torch.tensor([0, 1, 2, 0])
    for kind in LOSS_KINDS:
        _, parts = distillation_loss(LossConfig(kind=kind), s, y, t)
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad and v.ndim == 0 for v in parts.values())
