"""The registry's answer when the model asked for, or the default, is not served."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.engine.registry import ModelRegistry
from service.errors import UnknownModel
from service.settings import Settings


def test_an_empty_registry_names_what_is_missing_and_never_prints_none(tmp_path: Path) -> None:
    registry = ModelRegistry(Settings(store=tmp_path))
    with pytest.raises(UnknownModel, match=r"^no default model to serve; name one with `model`; available: none"):
        registry.get(None)
    with pytest.raises(UnknownModel, match=r"^unknown model 'resnet-9000'; available: none loaded$"):
        registry.get("resnet-9000")
