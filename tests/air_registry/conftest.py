"""Fixtures of the air_registry tests: the shipped catalog, and the tiny model built once per session."""

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
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A data dir holding the tiny model where the catalog expects it (the session's one build)."""
    data_dir = tmp_path_factory.mktemp("air-registry-data")
    (data_dir / "models").symlink_to(models_dir, target_is_directory=True)
    return data_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_data_dir: Path) -> Path:
    return tiny_data_dir / "models" / "imagewire-tiny-1"


@pytest.fixture(scope="session")
def pipelines(tiny_data_dir: Path) -> PipelineCache:
    """One CPU pipeline cache for the session: loading the tiny model once is enough."""
    from imagewire.air_registry.loader import PipelineCache

    return PipelineCache(device="cpu", data_dir=tiny_data_dir)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, and no network: hub models are then certainly missing."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import; the module values are what it uses.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache
