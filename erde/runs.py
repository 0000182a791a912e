"""Run folders: what `config.json` holds, the data splits a run trained on, its finished network,
and its calibration written beside it.

A run folder holds `config.json` (every option), `checkpoint.safetensors` and `state.json` after
every epoch, `weights.safetensors` at the end, `log.txt`, and `calibration.json` once calibrated.
Training (`erde.train`) writes it; calibration, export and resume read it through this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from erde.artifact import InputSpec
from erde.calibrate import exit_outputs, sweep
from erde.curve import CalibrationCurve
from erde.data import TensorData, load_dataset, train_val_split
from erde.losses import LossConfig
from erde.macs import macs_per_exit
from erde.nets import EarlyExitResNet, build_model, model_config

CALIBRATION = "calibration.json"


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run; written to config.json and read back by resume and export."""

    out_dir: str  # run folder: config, checkpoints, final weights, log
    arch: str = "resnet20"  # registered architecture (erde.nets.list_models())
    dataset: str = "fashion-mnist"  # see erde.data.DATASETS
    data_dir: str | None = None  # dataset folder; None = the dataset's default place
    download: bool = False  # let torchvision download CIFAR/SVHN (needs network)
    image_size: int = 32  # imagefolder only: side the images are resized to
    image_mode: str = "RGB"  # imagefolder only: "L" or "RGB"
    val_fraction: float = 0.1  # share of the training split held out for validation/calibration
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1  # peak SGD learning rate (cosine decay after one warm-up epoch)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0  # seeds init, split, order and augmentation
    threads: int = 0  # torch CPU threads; 0 = torch's default
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    teacher: str | None = None  # artifact folder of the teacher (students only)
    loss: LossConfig = field(default_factory=lambda: LossConfig(kind="ce"))
    max_train_batches: int = 0  # >0 caps batches per epoch (smoke tests)
    channels_last: bool = False  # NHWC tensors (GPU convolutions); how to run, not what: resume may change it
    compile: bool = False  # torch.compile the forward passes; how to run, like device and threads

    # Options that say how to run, not what to train: `--resume` takes them from its own command line.
    RUNTIME_FIELDS = ("device", "threads", "channels_last", "compile")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["loss"] = LossConfig(**data.get("loss", {}))
        return cls(**data)


@dataclass
class RunData:
    train: TensorData
    val: TensorData


def load_run_data(cfg: TrainConfig) -> RunData:
    """The training split and the validation split carved from it (same seed, same split)."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    full = load_dataset(cfg.dataset, "train", data_dir, cfg.download, cfg.image_size, cfg.image_mode)
    train, val = train_val_split(full, cfg.val_fraction, cfg.seed)
    return RunData(train, val)


def load_trained(run_dir: Path) -> tuple[TrainConfig, EarlyExitResNet, dict[str, Any]]:
    """A finished run's config, network (eval mode, CPU) and state (history, input spec, classes)."""
    run_dir = Path(run_dir)
    if not (run_dir / "weights.safetensors").is_file():
        raise ValueError(f"{run_dir} is not a finished run (no weights.safetensors); train or --resume it first")
    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    state = json.loads((run_dir / "state.json").read_text())
    spec = InputSpec.from_dict(state["input_spec"])
    net_cfg = model_config(cfg.arch, in_channels=spec.channels, input_size=spec.size,
                           num_classes=len(state["classes"]))
    model = build_model(net_cfg)
    model.load_state_dict(load_file(run_dir / "weights.safetensors"))
    return cfg, model.eval(), state


def calibrate_run(run_dir: Path, points: int = 401) -> CalibrationCurve:
    """Sweep θ on a finished run's validation split and write `calibration.json` into the run."""
    cfg, model, _ = load_trained(run_dir)
    curve = sweep(exit_outputs(model, load_run_data(cfg).val), macs_per_exit(model), points)
    (Path(run_dir) / CALIBRATION).write_text(json.dumps(curve.to_dict(), indent=1))
    return curve


def read_calibration(run_dir: Path) -> CalibrationCurve | None:
    """The run's stored calibration, or None when it has not been calibrated."""
    file = Path(run_dir) / CALIBRATION
    return CalibrationCurve.from_dict(json.loads(file.read_text())) if file.is_file() else None
