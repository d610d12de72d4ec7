"""Weights looked for where the device runs (``inputs.located_weights``, as a Ray replica does with each job it gets):
every model a job names, its own and its add-ons', found on this machine; a missing one fails naming its field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from imagewire.air_registry import Catalog, locate_weights
from imagewire.tasks.errors import ModelNotFound
from imagewire.tasks.inputs import located_weights
from imagewire.tasks.jobs import AddOn, InferenceJob, SafetyCheckJob

CATALOG = Catalog.load()
TINY, LORA, EMBEDDING, VAE = (CATALOG.resolve(name) for name in ("tiny", "tiny-lora", "tiny-embedding", "tiny-vae"))
ELSEWHERE = Path("the-gateway-machine")


def job(**fields: object) -> InferenceJob:
    return InferenceJob(**{"task_uuid": "t", "model": TINY, "weights": ELSEWHERE, "prompt": "a lighthouse",
                           "negative_prompt": None, "width": 128, "height": 128, "steps": 2, "cfg_scale": 7.0,
                           "sampler": None, "seeds": [1], **fields})  # type: ignore[arg-type]


def test_every_model_of_a_job_gets_the_weights_found_here(tmp_path: Path) -> None:
    sent = job(loras=(AddOn(LORA, ELSEWHERE, 0.5),), embeddings=(AddOn(EMBEDDING, ELSEWHERE, 1.0),),
               vae=AddOn(VAE, ELSEWHERE))
    found = located_weights(sent, data_dir=tmp_path, allow_downloads=False)

    def here(entry: object) -> Path:
        return locate_weights(entry, data_dir=tmp_path, allow_downloads=False)  # type: ignore[arg-type]

    assert found.weights == here(TINY) != ELSEWHERE
    assert [lora.weights for lora in found.loras] == [here(LORA)]
    assert [embedding.weights for embedding in found.embeddings] == [here(EMBEDDING)]
    assert found.vae is not None and found.vae.weights == here(VAE)
    # Only the weights change: the strengths, the prompt and the job as sent stay as they were.
    assert found.loras[0].weight == 0.5 and found.prompt == sent.prompt
    assert sent.weights == ELSEWHERE and sent.loras[0].weights == ELSEWHERE


def test_a_checkers_weights_are_found_too(tmp_path: Path) -> None:
    sent = SafetyCheckJob(task_uuid="t", checker=TINY, weights=ELSEWHERE, pictures=[])
    found = located_weights(sent, data_dir=tmp_path, allow_downloads=False)
    assert found.weights == locate_weights(TINY, data_dir=tmp_path, allow_downloads=False)


@pytest.mark.parametrize(("where", "parameter"), [("model", "model"), ("lora", "lora[1].model"),
                                                  ("vae", "vae")])
def test_missing_weights_fail_naming_the_field_that_named_the_model(tmp_path: Path, where: str,
                                                                    parameter: str) -> None:
    gone = "its folder was removed"
    fields: dict[str, object] = {"loras": (AddOn(LORA, ELSEWHERE, 0.5), AddOn(LORA, ELSEWHERE, 0.7))}
    if where == "model":
        fields["model"] = dataclasses.replace(TINY, problem=gone)
    elif where == "lora":
        fields["loras"] = (AddOn(LORA, ELSEWHERE, 0.5),
                           AddOn(dataclasses.replace(LORA, air="test:gone-lora@1", problem=gone), ELSEWHERE, 0.7))
    else:
        fields["vae"] = AddOn(dataclasses.replace(VAE, air="test:gone-vae@1", problem=gone), ELSEWHERE)
    with pytest.raises(ModelNotFound) as failed:
        located_weights(job(**fields), data_dir=tmp_path, allow_downloads=False)
    assert failed.value.parameter == parameter and gone in failed.value.message
