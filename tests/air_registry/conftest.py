"""Fixtures of the air_registry tests: the shipped catalog, and the tiny model built once per session (in
``tiny_data_dir``, tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imagewire.air_registry.catalog import Catalog, ModelEntry

if TYPE_CHECKING:
    from imagewire.air_registry.loader import PipelineCache


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.load()


@pytest.fixture(scope="session")
def tiny_entry(catalog: Catalog) -> ModelEntry:
    return catalog.resolve("imagewire:tiny@1")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_data_dir: Path) -> Path:
    return tiny_data_dir / "models" / "imagewire-tiny-1"


@pytest.fixture(scope="session")
def pipelines(tiny_data_dir: Path) -> PipelineCache:
    """One CPU pipeline cache for the session: loading the tiny model once is enough."""
    from imagewire.air_registry.loader import PipelineCache

    return PipelineCache(device="cpu", data_dir=tiny_data_dir)
