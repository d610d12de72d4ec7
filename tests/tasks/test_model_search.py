"""modelSearch's result shape: a catalog entry as the fields clients read."""

from __future__ import annotations

from imagewire.air_registry import Catalog, ModelEntry
from imagewire.tasks.model_search import model_info
from imagewire.tasks.schema import ModelInfo


def test_model_info_maps_an_entry_to_the_wire_struct() -> None:
    entry: ModelEntry = Catalog.load().resolve("sdxl-refiner-1.0")
    info = model_info(entry, available=False, comment="not downloaded")
    assert isinstance(info, ModelInfo)
    assert info.air == "imagewire:sdxl-refiner@1"
    assert info.version == "1"
    assert info.category == "checkpoint"
    assert info.architecture == "sdxl-refiner"
    assert info.tags == ["stable-diffusion", "sdxl", "refiner", "image-to-image"]
    assert info.private is False
    assert (info.defaultWidth, info.defaultHeight, info.defaultSteps) == (1024, 1024, 30)
    assert info.defaultScheduler == "Default"
    assert info.defaultCFG == 7.0
    assert info.defaultStrength == 0.3
    assert info.aliases == ["sdxl-refiner-1.0"]
    assert (info.available, info.comment) == (False, "not downloaded")


def test_an_embedding_reports_its_token_as_its_trigger_words() -> None:
    catalog = Catalog.load()
    embedding = model_info(catalog.resolve("tiny-embedding"), available=True, comment="")
    assert (embedding.category, embedding.architecture) == ("embeddings", "tiny")
    assert embedding.positiveTriggerWords == "<tiny-embedding>"
    assert model_info(catalog.resolve("tiny-lora"), available=True, comment="").positiveTriggerWords == ""
