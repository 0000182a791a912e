import itertools

import pytest
import torch

from erde.macs import macs_per_exit
from erde.nets import NetConfig, build_model, fuse_for_inference, list_models, model_config, register_model


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_every_architecture_runs_both_ways(arch: str, channels: int, size: int) -> None:
    model = build_model(model_config(arch, in_channels=channels, input_size=size, num_classes=7)).eval()
    x = torch.randn(2, channels, size, size)
    all_exits = model.forward_all(x)
    assert len(all_exits) == model.num_exits == 3
    h = x
    for i in range(model.num_exits):  # stage by stage gives the same logits as all at once
        h = model.stage(i, h)
        assert torch.allclose(model.exit(i, h), all_exits[i], atol=1e-5)
        assert all_exits[i].shape == (2, 7)
    assert torch.allclose(model(x), all_exits[-1], atol=1e-5)


@pytest.mark.parametrize("arch", list_models())
def test_macs_grow_with_exit_index(arch: str) -> None:
    macs = macs_per_exit(build_model(model_config(arch)))
    assert all(a < b for a, b in itertools.pairwise(macs))


def test_macs_are_measured_not_guessed() -> None:
    # One 3x3 conv stem on 1x8x8 with 4 channels: 8*8*9*4 = 2304 MACs, part of the first exit's cost.
    model = build_model(NetConfig(depth=8, widths=(4, 8, 8), input_size=8))
    assert macs_per_exit(model)[0] > 2304
    wider = build_model(NetConfig(depth=8, widths=(8, 8, 8), input_size=8))
    assert macs_per_exit(wider)[0] > 3 * macs_per_exit(model)[0]  # convs scale with width squared


def test_student_is_under_a_fifth_of_the_teacher() -> None:
    teacher = macs_per_exit(build_model(model_config("resnet20")))
    student = macs_per_exit(build_model(model_config("resnet8-slim")))
    assert student[-1] * 5 <= teacher[-1]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"depth": 9}, r"6n\+2"), ({"widths": (16,)}, "two positive"), ({"in_channels": 2}, "1 or 3"),
    ({"input_size": 4}, "at least 8"), ({"num_classes": 1}, "at least 2"), ({"stem_stride": 3}, "1 or 2"),
    ({"exit_pool": "max"}, "avg2, global"),
])
def test_bad_config_says_how_to_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NetConfig(**kwargs)


def test_registry_refuses_duplicates_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20", NetConfig())
    with pytest.raises(ValueError, match="unknown architecture"):
        model_config("resnet1000")


@pytest.mark.parametrize("arch", list_models())
def test_fused_network_answers_like_the_original(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(model_config(arch)).eval()
    for m in model.modules():  # non-trivial BN statistics, so folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    fused = fuse_for_inference(model)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()) == model.num_exits  # heads only
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        for a, b in zip(model.forward_all(x), fused.forward_all(x), strict=True):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_strided_stem_and_global_exits_cost_what_they_should() -> None:
    base = NetConfig(depth=8, widths=(16, 32, 64))
    plain, strided = (macs_per_exit(build_model(c)) for c in (base, NetConfig(**{**base.to_dict(), "stem_stride": 2})))
    assert 3.5 < plain[-1] / strided[-1] < 4.5  # every map a quarter of the pixels
    model = build_model(NetConfig(depth=8, widths=(8, 16, 32), exit_pool="global"))
    assert [head.fc.in_features for head in model.heads] == [8, 16, 32]  # one value a channel at every exit


def test_configs_without_the_new_fields_read_as_before() -> None:
    """Manifests written before stem_stride and exit_pool existed rebuild the same network."""
    old = {k: v for k, v in NetConfig(depth=8, widths=(8, 32, 64)).to_dict().items()
           if k not in ("stem_stride", "exit_pool")}
    assert NetConfig.from_dict(old) == model_config("resnet8-slim")


def test_candidate_students_are_under_a_fifth_of_the_teacher() -> None:
    teacher = macs_per_exit(build_model(model_config("resnet20")))[-1]
    for arch in ("resnet8-slim-gp", "resnet8-narrow", "resnet8-s2", "resnet14-s2"):
        assert macs_per_exit(build_model(model_config(arch)))[-1] * 5 <= teacher, arch
