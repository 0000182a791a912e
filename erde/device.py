"""Where a network runs, in one place for training and serving (`--device`, `ERDE_DEVICE`).

`auto` is CUDA when this torch sees a CUDA device, else the CPU; `cpu`, `cuda` and `cuda:N` are taken
as given and refused, with what is missing, when they are not there: a model is never moved to another
device than the one asked for.
"""

from __future__ import annotations

import re

import torch

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d{1,2})?)$"


def pick_device(name: str) -> torch.device:
    """The device `name` asks for; ValueError when it is malformed or not on this machine."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise ValueError(f"device {name!r}: torch {torch.__version__} ({built}) sees no CUDA device here")
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def describe(device: torch.device) -> str:
    """How /models and the metrics name a device: `cpu`, or `cuda:N (its name)`."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
