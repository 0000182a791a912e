"""The artifact reader refuses every kind of broken artifact, naming what is wrong."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from erde.artifact import ArtifactError, list_versions, read_stored, sha256_file
from erde.store import build_network, read_artifact


@pytest.fixture
def artifact(tiny_pipeline, tmp_path: Path) -> Path:
    copy = tmp_path / "student" / "1"
    shutil.copytree(tiny_pipeline.student_artifact, copy)
    return copy


def rewrite_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def refresh_sha(path: Path, file: str) -> None:
    rewrite_manifest(path, lambda m: m["files"].__setitem__(file, sha256_file(path / file)))


def load_copy(path: Path) -> dict[str, torch.Tensor]:
    """Tensors copied out of the memory map, so rewriting the file cannot pull pages from under them."""
    return {k: v.clone() for k, v in load_file(path).items()}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def drop_weight(path: Path) -> None:
    state = load_copy(path / "weights.safetensors")
    state.pop(sorted(state)[0])
    save_file(state, path / "weights.safetensors")
    refresh_sha(path, "weights.safetensors")


def wrong_shape(path: Path) -> None:
    state = load_copy(path / "weights.safetensors")
    key = next(k for k in sorted(state) if k.endswith("fc.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, path / "weights.safetensors")
    refresh_sha(path, "weights.safetensors")


def pickled_weights(path: Path) -> None:
    torch.save(load_copy(path / "weights.safetensors"), path / "weights.safetensors")
    refresh_sha(path, "weights.safetensors")


CASES = {
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    "manifest not json": (lambda p: (p / "manifest.json").write_text("{oops"), "not valid JSON"),
    "future schema": (lambda p: rewrite_manifest(p, lambda m: m.update(schema_version=99)), "schema_version"),
    "weights tampered": (lambda p: flip_byte(p / "weights.safetensors"), "weights.safetensors does not match"),
    "weights truncated": (lambda p: truncate(p / "weights.safetensors"), "weights.safetensors does not match"),
    "weights missing": (lambda p: (p / "weights.safetensors").unlink(), "weights.safetensors is missing"),
    "calibration tampered": (lambda p: flip_byte(p / "calibration.json"), "calibration.json does not match"),
    "card tampered": (lambda p: (p / "MODEL_CARD.md").write_text("better numbers"), "MODEL_CARD.md does not match"),
    "missing tensor": (drop_weight, "missing"),
    "wrong shape": (wrong_shape, "wrong shape"),
    "pickle instead of safetensors": (pickled_weights, "cannot be read"),
    "classes mismatch": (lambda p: rewrite_manifest(p, lambda m: m["classes"].append("extra")), "classes"),
    "macs mismatch": (lambda p: rewrite_manifest(p, lambda m: m["macs_per_exit"].append(1)), "macs_per_exit"),
    "path escape": (lambda p: rewrite_manifest(p, lambda m: m["files"].__setitem__("../x", "0")), "outside"),
    "bad net config": (lambda p: rewrite_manifest(p, lambda m: m["net"].update(depth=7)), "network config"),
    "latency not a table": (lambda p: rewrite_manifest(p, lambda m: m.update(exit_latency=[1, 2])), "exit_latency"),
    "latency short of an exit": (lambda p: rewrite_manifest(p, lambda m: m["exit_latency"]["ms"]["1"].pop()),
                                 "exit_latency"),
    "latency negative": (lambda p: rewrite_manifest(p, lambda m: m["exit_latency"]["ms"]["32"].__setitem__(0, -1)),
                         "exit_latency"),
    "latency batch not a number": (lambda p: rewrite_manifest(
        p, lambda m: m["exit_latency"]["ms"].__setitem__("many", [1.0, 2.0, 3.0])), "exit_latency"),
}


@pytest.mark.parametrize("case", CASES)
def test_broken_artifact_is_refused_with_a_reason(artifact: Path, case: str) -> None:
    read_artifact(artifact)  # intact first
    breaker, message = CASES[case]
    breaker(artifact)
    with pytest.raises(ArtifactError, match=message):
        read_artifact(artifact)


def test_list_versions_skips_temporaries(tiny_pipeline, tmp_path: Path) -> None:
    for v in ("1", "2", "10"):
        shutil.copytree(tiny_pipeline.student_artifact, tmp_path / "m" / v)
    (tmp_path / "m" / ".3.tmp").mkdir()
    (tmp_path / "m" / "notes").mkdir()
    assert list_versions(tmp_path) == {"m": ["1", "2", "10"]}


def test_an_artifact_without_latency_still_reads(artifact: Path) -> None:
    """exit_latency is optional: artifacts written before it (the shipped fashion-mnist/1) stay valid."""
    rewrite_manifest(artifact, lambda m: m.pop("exit_latency"))
    assert "exit_latency" not in read_artifact(artifact).manifest


def test_the_weights_handed_on_are_the_ones_verified(artifact: Path) -> None:
    """The server verifies an artifact without torch and hands its weights' bytes to the inference process:
    bytes that changed after the verification are refused, never built into a network."""
    stored = read_stored(artifact)
    assert build_network(stored.manifest, stored.weights()).num_exits == stored.num_exits
    flip_byte(artifact / "weights.safetensors")
    with pytest.raises(ArtifactError, match="changed since it was verified"):
        stored.weights()
