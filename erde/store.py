"""The model store with torch: artifacts written atomically, and read back with their network built.

What an artifact holds and how it is verified is `erde.artifact`'s, which needs no torch; this module
adds the network: `write_artifact` saves one, `build_network` rebuilds it from a manifest and the
weights' bytes, refusing weights that do not fit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save_file

from erde.artifact import (
    CALIBRATION,
    CARD,
    MANIFEST,
    NAME_RE,
    SCHEMA_VERSION,
    WEIGHTS,
    ArtifactError,
    InputSpec,
    StoredArtifact,
    read_stored,
    sha256_file,
)
from erde.curve import CalibrationCurve
from erde.nets import EarlyExitResNet, NetConfig, build_model


@dataclass
class Artifact(StoredArtifact):
    model: EarlyExitResNet  # eval mode, CPU


def write_artifact(root: Path, name: str, version: str, model: EarlyExitResNet, spec: InputSpec,
                   classes: list[str], calibration: CalibrationCurve, metadata: dict[str, Any],
                   card: str, overwrite: bool = False) -> Path:
    """Write an artifact atomically: built in a temporary folder beside it, then renamed into place."""
    if not NAME_RE.match(name):
        raise ValueError(f"model name {name!r} must be 1-64 letters, digits, '-' or '_'")
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    final = Path(root) / name / version
    if final.exists() and not overwrite:
        raise ValueError(f"{final} already exists; choose another --version or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=final.parent))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
    (tmp / CALIBRATION).write_text(json.dumps(calibration.to_dict(), indent=1))
    (tmp / CARD).write_text(card)
    manifest = {
        "schema_version": SCHEMA_VERSION, "name": name, "version": version, "classes": classes,
        "input": spec.to_dict(), "net": model.config.to_dict(), "num_exits": model.num_exits,
        "macs_per_exit": calibration.macs_per_exit, **metadata,
        "files": {f: sha256_file(tmp / f) for f in (WEIGHTS, CALIBRATION, CARD)},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for file in tmp.iterdir():  # readable by a service running as another user (mkdtemp makes 0700)
        file.chmod(0o644)
    tmp.chmod(0o755)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def build_network(manifest: dict[str, Any], weights: bytes) -> EarlyExitResNet:
    """The network a verified manifest describes, with these safetensors bytes as its weights; ArtifactError
    when they do not fit (where the network runs: the inference process, or an offline tool)."""
    try:
        config = NetConfig.from_dict(manifest["net"])
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{MANIFEST}: bad network config: {exc}") from None
    if len(manifest["classes"]) != config.num_classes:
        raise ArtifactError(f"{MANIFEST}: {len(manifest['classes'])} classes but the network has {config.num_classes}")
    model = build_model(config)
    if len(manifest["macs_per_exit"]) != model.num_exits:
        raise ArtifactError(f"{MANIFEST}: macs_per_exit has {len(manifest['macs_per_exit'])} entries "
                            f"for {model.num_exits} exits")
    try:
        state = load(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{WEIGHTS} cannot be read: {exc}") from None
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{WEIGHTS} does not fit the network: missing {missing[:3]}, unexpected {extra[:3]}")
    wrong = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ArtifactError(f"{WEIGHTS} does not fit the network: wrong shape for {wrong[:3]}")
    spec = InputSpec.from_dict(manifest["input"])
    if spec.channels != model.config.in_channels or spec.size != model.config.input_size:
        raise ArtifactError(f"{MANIFEST}: input spec does not match the network's input")
    model.load_state_dict(state)
    return model.eval()


def read_artifact(path: Path) -> Artifact:
    """Verify and load one artifact folder, its network built; raises ArtifactError naming what is wrong."""
    stored = read_stored(path)
    model = build_network(stored.manifest, stored.weights())
    return Artifact(stored.path, stored.manifest, stored.calibration, stored.spec, model)
