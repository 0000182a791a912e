"""The model store without torch: `<root>/<name>/<version>/` artifacts listed, verified and read as data.

An artifact is `manifest.json` (config, input spec, classes, MACs, metrics, sha256 of every file),
`weights.safetensors` (never pickle), `calibration.json` and `MODEL_CARD.md`. This module refuses
anything tampered, truncated or mismatched, naming what is wrong, and gives the serving process all it
needs from an artifact without importing torch (docs/architecture.md, "No torch in the server"):
`erde.store` builds the network from these bytes where torch is, and writes artifacts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from erde.curve import CalibrationCurve

log = logging.getLogger("erde.store")

SCHEMA_VERSION = 1
WEIGHTS, CALIBRATION, MANIFEST, CARD = "weights.safetensors", "calibration.json", "manifest.json", "MODEL_CARD.md"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")  # ASCII digits, no leading zero


class ArtifactError(ValueError):
    """An artifact that cannot be trusted or used; the message names the file and the problem."""


@dataclass(frozen=True)
class InputSpec:
    """How a raw image becomes the network's input; stored in the artifact's manifest."""

    mode: str  # PIL mode the image is converted to: "L" (grayscale) or "RGB"
    size: int  # square side in pixels the image is resized to
    mean: tuple[float, ...]  # per-channel mean on the 0..1 scale
    std: tuple[float, ...]  # per-channel std on the 0..1 scale

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        if data.get("mode") not in ("L", "RGB"):
            raise ValueError(f"input mode must be 'L' or 'RGB', got {data.get('mode')!r}")
        return cls(mode=data["mode"], size=int(data["size"]),
                   mean=tuple(float(m) for m in data["mean"]), std=tuple(float(s) for s in data["std"]))


@dataclass
class StoredArtifact:
    """A verified artifact as data: every file matches its sha256, the manifest, spec and curve parse."""

    path: Path
    manifest: dict[str, Any]
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

    @property
    def num_exits(self) -> int:
        return len(self.macs_per_exit)

    def weights(self) -> bytes:
        """The weights file's bytes, checked against the manifest's sha256 once more as they are read: what
        the network is built from is what was verified."""
        data = (self.path / WEIGHTS).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["files"][WEIGHTS]:
            raise ArtifactError(f"{WEIGHTS} changed since it was verified")
        return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def read_stored(path: Path) -> StoredArtifact:
    """Verify one artifact folder without building its network; raises ArtifactError naming what is wrong."""
    path = Path(path)
    manifest = _load_manifest(path)
    _verify_files(path, manifest)
    try:
        spec = InputSpec.from_dict(manifest["input"])
        calibration = CalibrationCurve.from_dict(json.loads((path / CALIBRATION).read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(str(exc)) from None
    if calibration.macs_per_exit != manifest["macs_per_exit"]:
        raise ArtifactError(f"{CALIBRATION} was made for other MACs per exit than {MANIFEST}'s macs_per_exit")
    _check_latency(manifest, len(manifest["macs_per_exit"]))
    return StoredArtifact(path, manifest, calibration, spec)


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
