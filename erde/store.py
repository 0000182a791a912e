"""The model store: `<root>/<name>/<version>/` artifacts, written and read back with verification.

An artifact is data: `manifest.json` (config, input spec, classes, MACs, metrics, sha256 of every
file), `weights.safetensors` (never pickle), `calibration.json` and `MODEL_CARD.md`. The reader
rebuilds the network from the manifest and refuses anything tampered, truncated or mismatched,
naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from erde.calibrate import CalibrationCurve
from erde.data import InputSpec
from erde.nets import EarlyExitResNet, NetConfig, build_model

log = logging.getLogger("erde.store")

SCHEMA_VERSION = 1
WEIGHTS, CALIBRATION, MANIFEST, CARD = "weights.safetensors", "calibration.json", "manifest.json", "MODEL_CARD.md"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")  # ASCII digits, no leading zero


class ArtifactError(ValueError):
    """An artifact that cannot be trusted or used; the message names the file and the problem."""


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    model: EarlyExitResNet  # eval mode, CPU
    calibration: CalibrationCurve
    spec: InputSpec

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def macs_per_exit(self) -> list[int]:
        return self.manifest["macs_per_exit"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def _load_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path.name}: no {MANIFEST}; not an artifact folder")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{MANIFEST} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{MANIFEST} must hold a JSON object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{MANIFEST}: schema_version {manifest.get('schema_version')!r} is not supported "
                            f"(this reader knows {SCHEMA_VERSION})")
    missing = [k for k in ("name", "version", "classes", "input", "net", "macs_per_exit", "files") if k not in manifest]
    if missing:
        raise ArtifactError(f"{MANIFEST} lacks {', '.join(missing)}")
    return manifest


def _verify_files(path: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    for required in (WEIGHTS, CALIBRATION):
        if required not in files:
            raise ArtifactError(f"{MANIFEST} lists no sha256 for {required}")
    for name, expected in files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise ArtifactError(f"{MANIFEST} names a file outside the artifact: {name!r}")
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{name} is missing")
        if sha256_file(file) != expected:
            raise ArtifactError(f"{name} does not match its sha256 in {MANIFEST} (tampered or truncated)")


def _build(path: Path, manifest: dict[str, Any]) -> EarlyExitResNet:
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
        state = load_file(path / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{WEIGHTS} cannot be read: {exc}") from None
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{WEIGHTS} does not fit the network: missing {missing[:3]}, unexpected {extra[:3]}")
    wrong = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ArtifactError(f"{WEIGHTS} does not fit the network: wrong shape for {wrong[:3]}")
    model.load_state_dict(state)
    return model.eval()


def read_artifact(path: Path) -> Artifact:
    """Verify and load one artifact folder; raises ArtifactError naming what is wrong."""
    path = Path(path)
    manifest = _load_manifest(path)
    _verify_files(path, manifest)
    model = _build(path, manifest)
    try:
        spec = InputSpec.from_dict(manifest["input"])
        calibration = CalibrationCurve.from_dict(json.loads((path / CALIBRATION).read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(str(exc)) from None
    if calibration.macs_per_exit != manifest["macs_per_exit"]:
        raise ArtifactError(f"{CALIBRATION} was made for other MACs per exit than {MANIFEST} states")
    if spec.channels != model.config.in_channels or spec.size != model.config.input_size:
        raise ArtifactError(f"{MANIFEST}: input spec does not match the network's input")
    _check_latency(manifest, model.num_exits)
    return Artifact(path, manifest, model, calibration, spec)


def _check_latency(manifest: dict[str, Any], num_exits: int) -> None:
    """`exit_latency` is optional (artifacts before it lack it); when present, `ms` maps each batch
    size to one non-negative time per exit, so what /models shows is well formed."""
    latency = manifest.get("exit_latency")
    if latency is None:
        return
    per_batch = latency.get("ms") if isinstance(latency, dict) else None
    if not isinstance(per_batch, dict) or not per_batch or not all(
            str(size).isdecimal() and isinstance(times, list) and len(times) == num_exits
            and all(isinstance(t, int | float) and not isinstance(t, bool) and t >= 0 for t in times)
            for size, times in per_batch.items()):
        raise ArtifactError(f"{MANIFEST}: exit_latency.ms must map batch sizes to {num_exits} times (ms), one an exit")


def list_versions(root: Path) -> dict[str, list[str]]:
    """Model name -> version folders present (ascending), skipping and logging what is neither.

    A version is a folder named by a positive integer in ASCII digits ("²".isdigit() is true, but
    int("²") fails; "01" would shadow "1"). Hidden folders (a write in progress) are skipped
    silently, plain files too. Symlinks are followed only when their target lies inside the store
    root: a link out of the store is refused, so the store is the one place the service loads from.
    An unreadable folder is skipped, so one bad entry never stops a start or a reload.
    """
    root = Path(root).resolve()
    found: dict[str, list[str]] = {}
    for model_dir in _entries(root):
        if not NAME_RE.fullmatch(model_dir.name):
            log.warning("store: skipped %r: not a model name (%s)", model_dir.name, NAME_RE.pattern)
            continue
        versions = []
        for version_dir in _entries(model_dir, root):
            if VERSION_RE.fullmatch(version_dir.name):
                versions.append(version_dir.name)
            else:
                log.warning("store: skipped %s/%r: not a version (a positive integer)", model_dir.name,
                            version_dir.name)
        if versions:
            found[model_dir.name] = sorted(versions, key=int)
    return found


def _entries(folder: Path, root: Path | None = None) -> list[Path]:
    """The visible folders in `folder` that the store may read (see `list_versions`), sorted."""
    root = root or folder
    try:
        children = sorted(folder.iterdir())
    except OSError as exc:
        log.warning("store: cannot list %s: %s", folder, exc.strerror)
        return []
    folders = []
    for child in children:
        if child.name.startswith(".") or not child.is_dir():
            continue
        if child.is_symlink() and not child.resolve().is_relative_to(root):
            log.warning("store: skipped %s: a symlink out of the store", child.relative_to(root))
            continue
        folders.append(child)
    return folders
