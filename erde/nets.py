"""Early-exit CIFAR-style ResNets: one exit head after every stage.

The network is built from a frozen config (data, not code) through a registry of named
architectures, so that an artifact can store the config and the reader can rebuild the exact
network. Two ways to run it: `forward_all` (training: every exit's logits at once) and
`stage(i, x)` / `exit(i, h)` (serving: run stage by stage and stop rows early).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

EXIT_POOLS = ("avg2", "global")  # how intermediate exits pool their map before the FC


@dataclass(frozen=True)
class NetConfig:
    """Everything needed to rebuild an early-exit ResNet; stored in every artifact."""

    depth: int = 20  # 6n+2 as in He et al. 2016: n BasicBlocks per stage, 3 stages
    widths: tuple[int, ...] = (16, 32, 64)  # channels of each stage; one exit per stage
    in_channels: int = 1  # 1 for grayscale inputs, 3 for RGB
    input_size: int = 28  # square input side in pixels
    num_classes: int = 10
    head_dropout: float = 0.5  # dropout in the intermediate exit heads (the paper's 0.5)
    stem_stride: int = 1  # 2 halves every map from the stem on: a cheaper stem, an exit 0 that costs less
    exit_pool: str = "avg2"  # intermediate exits: "avg2" (the paper's 2x2 average) or "global" (one value a channel)

    def __post_init__(self) -> None:
        if (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {self.depth}")
        if len(self.widths) < 2 or any(w < 1 for w in self.widths):
            raise ValueError(f"widths needs at least two positive stage widths, got {self.widths}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.input_size < 8:
            raise ValueError(f"input_size must be at least 8 pixels, got {self.input_size}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.exit_pool not in EXIT_POOLS:
            raise ValueError(f"exit_pool must be one of {', '.join(EXIT_POOLS)}, got {self.exit_pool!r}")

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "widths" in known:
            known["widths"] = tuple(known["widths"])
        return cls(**known)


NormLayer = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ExitHead(nn.Module):
    """The paper's exit: BN -> ReLU -> 2x2 avg-pool -> Dropout -> FC (or global pooling: `exit_pool`).

    The last exit is the ordinary classifier, where the map is small: global pooling, no dropout.
    """

    def __init__(self, channels: int, spatial: int, num_classes: int, dropout: float, last: bool,
                 pool_kind: str = "avg2") -> None:
        super().__init__()
        pooled_globally = last or pool_kind == "global"
        pool: nn.Module = nn.AdaptiveAvgPool2d(1) if pooled_globally else nn.AvgPool2d(2)
        pooled = 1 if pooled_globally else spatial // 2
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            pool,
            nn.Dropout(0.0 if last else dropout),
            nn.Flatten(),
        )
        self.fc = nn.Linear(channels * pooled * pooled, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(self.body(h))


class EarlyExitResNet(nn.Module):
    """CIFAR-style ResNet whose stage i is followed by exit head i."""

    def __init__(self, config: NetConfig, norm: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.config = config
        w0 = config.widths[0]
        stem = nn.Sequential(nn.Conv2d(config.in_channels, w0, 3, config.stem_stride, 1, bias=False), norm(w0),
                             nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        heads: list[nn.Module] = []
        cin, spatial = w0, (config.input_size + config.stem_stride - 1) // config.stem_stride
        for i, width in enumerate(config.widths):
            stride = 1 if i == 0 else 2
            spatial = (spatial + stride - 1) // stride
            blocks = [BasicBlock(cin if b == 0 else width, width, stride if b == 0 else 1, norm)
                      for b in range(config.blocks_per_stage)]
            stages.append(nn.Sequential(stem, *blocks) if i == 0 else nn.Sequential(*blocks))
            last = i == len(config.widths) - 1
            heads.append(ExitHead(width, spatial, config.num_classes, config.head_dropout, last, config.exit_pool))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero the last BN of each residual branch: every block starts as identity (Goyal et al.).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Run backbone stage i (0-based) on the previous stage's features (or the image)."""
        return self.stages[i](x)

    def exit(self, i: int, h: Tensor) -> Tensor:
        """Logits of exit i from stage i's features: (B, C, H, W) -> (B, K)."""
        return self.heads[i](h)

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit, shallowest first: n tensors of shape (B, K)."""
        logits = []
        h = x
        for i in range(self.num_exits):
            h = self.stage(i, h)
            logits.append(self.exit(i, h))
        return logits

    def forward(self, x: Tensor) -> Tensor:
        """The full-depth classifier (last exit), so the net works as a plain classifier."""
        h = x
        for i in range(self.num_exits):
            h = self.stage(i, h)
        return self.exit(self.num_exits - 1, h)


_REGISTRY: dict[str, NetConfig] = {}


def register_model(name: str, config: NetConfig) -> None:
    """Register a named architecture; refuses a duplicate name."""
    if name in _REGISTRY:
        raise ValueError(f"architecture {name!r} is already registered")
    _REGISTRY[name] = config


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str, **overrides: Any) -> NetConfig:
    """The registered config of `name`, with data-dependent fields (channels, size, classes) overridden."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(list_models())}")
    return replace(_REGISTRY[name], **overrides)


def build_model(config: NetConfig) -> EarlyExitResNet:
    return EarlyExitResNet(config)


def _fold(conv: nn.Module, bn: nn.Module) -> tuple[nn.Module, nn.Module]:
    return fuse_conv_bn_eval(conv, bn), nn.Identity()


def _fold_pool_into_fc(head: ExitHead, spatial: int) -> None:
    """AvgPool2d(2) -> Flatten -> FC is one linear map: fold it into a wider FC (eval only).

    On a CPU the pooling of a large early map costs several times more than the wider FC.
    """
    pool = head.body[2]
    if not isinstance(pool, nn.AvgPool2d):
        return
    fc, half = head.fc, spatial // 2
    weight = fc.weight.view(fc.out_features, -1, half, half)  # (K, C, S/2, S/2)
    weight = weight.repeat_interleave(2, 2).repeat_interleave(2, 3) / 4  # (K, C, 2*(S/2), 2*(S/2))
    weight = nn.functional.pad(weight, (0, spatial - 2 * half, 0, spatial - 2 * half))  # odd S: last row unused
    wide = nn.Linear(weight[0].numel(), fc.out_features)
    wide.weight.copy_(weight.reshape(fc.out_features, -1))
    wide.bias.copy_(fc.bias)
    head.body = nn.Sequential(head.body[0], head.body[1], nn.Flatten())  # BN, ReLU, (no pool, no dropout)
    head.fc = wide


@torch.no_grad()
def fuse_for_inference(model: EarlyExitResNet) -> EarlyExitResNet:
    """A copy for serving: every conv's BatchNorm folded into the conv, and the intermediate exits'
    2x2 pooling folded into their FC.

    Same logits (to float rounding), fewer and cheaper ops per stage: for small networks at small
    batches the per-op cost, not arithmetic, is what a stage costs. The heads' BN follows a ReLU
    and stays.
    """
    fused = copy.deepcopy(model).eval()
    h = torch.zeros(1, model.config.in_channels, model.config.input_size, model.config.input_size)
    for i, head in enumerate(fused.heads):
        h = fused.stage(i, h)
        _fold_pool_into_fc(head, h.shape[-1])
    stem = fused.stages[0][0]
    stem[0], stem[1] = _fold(stem[0], stem[1])
    for block in fused.modules():
        if isinstance(block, BasicBlock):
            block.conv1, block.bn1 = _fold(block.conv1, block.bn1)
            block.conv2, block.bn2 = _fold(block.conv2, block.bn2)
            if isinstance(block.shortcut, nn.Sequential):
                block.shortcut = fuse_conv_bn_eval(block.shortcut[0], block.shortcut[1])
    return fused


# Teacher and student share three stages, hence three exits matched one to one. MACs at 28x28, 1 channel.
register_model("resnet20", NetConfig(depth=20, widths=(16, 32, 64)))  # teacher: 31.1 MMACs
register_model("resnet8", NetConfig(depth=8, widths=(16, 32, 64)))  # 9.4 MMACs
# Student: a slim first stage (8 channels at full resolution) makes exit 0 cost 16% of the student
# and the student 19.7% of the teacher, so budgets from 0.16 up all mean something.
register_model("resnet8-slim", NetConfig(depth=8, widths=(8, 32, 64)))  # 6.1 MMACs
# Candidates for a student whose time tracks its MACs (issue 14; `make bench` measures them): on a CPU
# an 8-channel stage at full resolution costs far more time per MAC than the later stages do.
register_model("resnet8-slim-gp", NetConfig(depth=8, widths=(8, 32, 64), exit_pool="global"))  # 6.1 MMACs
register_model("resnet8-narrow", NetConfig(depth=8, widths=(4, 32, 64)))  # 5.2 MMACs, exit 0 at 5%
# The one v2 trains (reports/exit-latency.md): a stride-2 stem leaves no narrow full-resolution stage, so
# its exits' time fractions stay closest to their MACs fractions, and full depth costs about half of
# resnet8-slim's time at batch 32 for 91% of its MACs.
register_model("resnet8-s2", NetConfig(depth=8, widths=(16, 64, 96), stem_stride=2))  # 5.6 MMACs, maps 14/7/4
register_model("resnet14-s2", NetConfig(depth=14, widths=(16, 32, 64), stem_stride=2))  # 5.6 MMACs, 2 blocks/stage
register_model("tiny", NetConfig(depth=8, widths=(4, 8, 8)))  # for tests and smoke runs
