"""LoRAs, embeddings, VAEs, CLIP skip, prompt weighting and the SDXL refiner on the diffusers engine, with the
embedded tiny models: at fixed seeds, each changes the image where it must and leaves it alone where it must not."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imagewire.air_registry.catalog import Catalog, ModelEntry
from imagewire.air_registry.tiny.lora import write_lora
from imagewire.air_registry.weights import locate_weights
from imagewire.server.engine import DiffusersEngine
from imagewire.server.engine.conditioning import sd_embeds_fragments, skipping_clip_layers
from imagewire.tasks.errors import TaskError
from imagewire.tasks.jobs import AddOn, InferenceJob, RefinerPass
from tests.engines import Collect, diffusers_engine
from tests.images import difference, image, images

CATALOG = Catalog.load()
TINY, TINY_SDXL, REFINER = (CATALOG.resolve(name) for name in ("tiny", "tiny-sdxl", "tiny-sdxl-refiner"))
LORA, EMBEDDING, VAE = (CATALOG.resolve(name) for name in ("tiny-lora", "tiny-embedding", "tiny-vae"))
# Batched and single calls may round differently in the last bit; anything a feature does moves pixels by far more.
SAME = 2


@pytest.fixture(scope="module")
def engine(module_data_dir: Path) -> DiffusersEngine:
    """One engine for the module: the tiny model and the SDXL pair stay loaded between tests."""
    return diffusers_engine(module_data_dir, max_loaded_models=3)


@pytest.fixture(scope="module")
def second_lora(tmp_path_factory: pytest.TempPathFactory) -> ModelEntry:
    """Another LoRA for the tiny model, as an operator adds one: a single file named in a catalog entry."""
    path = write_lora(tmp_path_factory.mktemp("loras") / "second.safetensors", seed=99)
    return dataclasses.replace(LORA, air="test:second-lora@1", name="second LoRA", source="single_file",
                               location=str(path), aliases=())


@pytest.fixture
def add_on(module_data_dir: Path) -> Callable[..., AddOn]:
    def make(entry: ModelEntry, weight: float = 1.0) -> AddOn:
        return AddOn(entry, locate_weights(entry, data_dir=module_data_dir, allow_downloads=False), weight)

    return make


@pytest.fixture
def job(module_data_dir: Path) -> Callable[..., InferenceJob]:
    def make(prompt: str = "a red fox in the snow", *, model: ModelEntry = TINY, seeds: tuple[int, ...] = (5,),
             **fields: Any) -> InferenceJob:
        weights = locate_weights(model, data_dir=module_data_dir, allow_downloads=False)
        settings: dict[str, Any] = {"negative_prompt": None, "width": 128, "height": 128, "steps": 3,
                                    "cfg_scale": 7.0, "sampler": None, **fields}
        return InferenceJob(task_uuid=f"{prompt}-{seeds}", model=model, weights=weights, prompt=prompt,
                            seeds=list(seeds), **settings)

    return make


# ---------------------------------------------------------------- LoRA


def test_a_lora_at_weight_one_changes_the_image_and_at_weight_zero_does_not(engine, job, add_on):
    plain = image(engine, job())
    with_lora = image(engine, job(loras=(add_on(LORA, 1.0),)))
    at_zero = image(engine, job(loras=(add_on(LORA, 0.0),)))
    stronger = image(engine, job(loras=(add_on(LORA, 2.0),)))
    assert difference(with_lora, plain) > 20
    assert difference(at_zero, plain) <= SAME
    assert difference(stronger, with_lora) > 20
    # Switched off again for a job without LoRAs: the model itself was never changed.
    assert difference(image(engine, job()), plain) <= SAME


def test_two_loras_differ_from_either_alone(engine, job, add_on, second_lora):
    first = image(engine, job(loras=(add_on(LORA),)))
    second = image(engine, job(loras=(add_on(second_lora),)))
    both = image(engine, job(loras=(add_on(LORA), add_on(second_lora))))
    assert difference(first, second) > 20
    assert difference(both, first) > 20 and difference(both, second) > 20
    # The order of a set does not matter.
    assert difference(image(engine, job(loras=(add_on(second_lora), add_on(LORA)))), both) <= SAME


def test_a_lora_is_loaded_once_per_model_and_switched_by_name(engine, job, add_on, second_lora, caplog):
    image(engine, job(loras=(add_on(LORA), add_on(second_lora))))  # both loaded (if no test did before)
    pipe = engine.pipelines.text_to_image(TINY)
    with caplog.at_level(logging.INFO, logger="imagewire"):
        for weight in (0.5, 1.5):
            image(engine, job(loras=(add_on(LORA, weight),)))
            image(engine, job(loras=(add_on(second_lora, weight),)))
            image(engine, job())
    assert not [record for record in caplog.records if "loaded LoRA" in record.getMessage()
                or "loading model" in record.getMessage()]
    assert engine.pipelines.text_to_image(TINY) is pipe  # the same pipeline: the model was not reloaded
    assert {"imagewire:tiny-lora@1", "test:second-lora@1"} <= set(engine.pipelines.memory)


def test_jobs_with_different_lora_sets_never_share_a_call_and_each_gets_its_own_image(engine, job, add_on, second_lora):
    sets = {"none": (), "first": (add_on(LORA),), "both": (add_on(LORA), add_on(second_lora, 0.5)),
            "weaker": (add_on(LORA, 0.5),)}
    jobs = {name: job(f"a {name} fox", seeds=(11,), loras=loras) for name, loras in sets.items()}
    assert len({one.batch_key() for one in jobs.values()}) == len(jobs)
    # The same set (in another order) is the same key: those still batch.
    again = job("another fox", seeds=(12,), loras=(add_on(second_lora, 0.5), add_on(LORA)))
    assert again.batch_key() == jobs["both"].batch_key()
    alone = {name: image(engine, one) for name, one in jobs.items()}
    # Run as the device queue would, each set's jobs in their own call, interleaved with the others.
    shared = images(engine, jobs["both"], again)
    assert difference(shared[0], alone["both"]) <= SAME
    assert difference(shared[1], image(engine, again)) <= SAME
    for name in ("weaker", "none", "first"):
        assert difference(image(engine, jobs[name]), alone[name]) <= SAME
    assert min(difference(alone[a], alone[b]) for a in sets for b in sets if a < b) > 10


def test_a_lora_that_does_not_fit_fails_naming_its_parameter(engine, job, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 999),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(999, 4)}, str(path))
    wrong = dataclasses.replace(LORA, air="test:wrong-shape@1", source="single_file", location=str(path))
    fitting = AddOn(LORA, locate_weights(LORA, data_dir=engine.pipelines.data_dir, allow_downloads=False))
    with pytest.raises(TaskError) as caught:
        image(engine, job(loras=(fitting, AddOn(wrong, path))))
    error = caught.value
    assert (error.code, error.parameter) == ("invalidParameter", "lora[1].model")
    assert "test:wrong-shape@1" in error.message and "do not load as a LoRA" in error.message
    assert str(tmp_path) not in error.message
    # The model is untouched: the next job runs, with or without the LoRA that fits.
    assert difference(image(engine, job(loras=(fitting,))), image(engine, job(loras=(fitting,)))) <= SAME


# ---------------------------------------------------------------- embeddings


def test_an_embedding_changes_the_image_only_where_its_token_is_in_the_prompt(engine, job, add_on):
    token = EMBEDDING.token
    embedding = (add_on(EMBEDDING),)
    with_token = image(engine, job(f"a fox, {token}", embeddings=embedding))
    assert difference(with_token, image(engine, job(f"a fox, {token}"))) > 20
    assert difference(image(engine, job("a fox", embeddings=embedding)), image(engine, job("a fox"))) <= SAME
    # Its weight scales it; asked again, it gives the same image as the first time.
    assert difference(image(engine, job(f"a fox, {token}", embeddings=(add_on(EMBEDDING, 0.3),))), with_token) > 5
    assert difference(image(engine, job(f"a fox, {token}", embeddings=embedding)), with_token) <= SAME


# ---------------------------------------------------------------- VAE


def test_a_vae_replaces_the_models_own_for_its_call_without_reloading_the_model(engine, job, add_on, caplog):
    plain = image(engine, job())
    pipe = engine.pipelines.text_to_image(TINY)
    own_vae = pipe.vae
    with caplog.at_level(logging.INFO, logger="imagewire"):
        swapped = image(engine, job(vae=add_on(VAE)))
        assert engine.pipelines.text_to_image(TINY) is pipe
        back = image(engine, job())
    assert difference(swapped, plain) > 20
    assert difference(back, plain) <= SAME and pipe.vae is own_vae
    assert not [record for record in caplog.records if "loading model" in record.getMessage()]


# ---------------------------------------------------------------- CLIP skip


def test_clip_skip_changes_the_image_and_is_the_hidden_state_it_names(engine, job):
    plain, skip_one, skip_two = (image(engine, job(clip_skip=skip)) for skip in (0, 1, 2))
    assert difference(plain, skip_one) > 20 and difference(skip_one, skip_two) > 20
    # What diffusers' clip_skip means for SD: the final layer norm of hidden state -(k + 1).
    pipe = engine.pipelines.text_to_image(TINY)
    ids = pipe.tokenizer(["a red fox"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        with skipping_clip_layers([pipe], 1):
            skipped = pipe.text_encoder(ids)[0]
        full = pipe.text_encoder(ids)[0]
        expected = pipe.text_encoder.final_layer_norm(states[-2])
    assert torch.allclose(skipped, expected, atol=1e-6)
    assert not torch.allclose(full, skipped)  # and the layers are back afterwards
    assert len(pipe.text_encoder.encoder.layers) == pipe.text_encoder.config.num_hidden_layers


def test_clip_skip_first_on_a_fresh_model_leaves_its_plain_images_alone(module_data_dir, job):
    # A model whose encoders first run shortened must still report every layer's hidden state afterwards.
    fresh = diffusers_engine(module_data_dir)
    skipped = image(fresh, job(model=TINY_SDXL, clip_skip=1))
    plain = image(fresh, job(model=TINY_SDXL))
    reference = diffusers_engine(module_data_dir)
    assert difference(plain, image(reference, job(model=TINY_SDXL))) <= SAME
    assert difference(skipped, plain) > 20


# ---------------------------------------------------------------- prompt weighting


def test_compel_weights_change_the_image_and_plain_text_stays_plain(engine, job):
    stronger = image(engine, job("a (cat)1.5 on a sofa", prompt_weighting="compel"))
    weaker = image(engine, job("a (cat)0.5 on a sofa", prompt_weighting="compel"))
    assert difference(stronger, weaker) > 20
    assert difference(image(engine, job("a cat on a sofa", prompt_weighting="compel")),
                      image(engine, job("a cat on a sofa"))) <= SAME


def test_sd_embeds_syntax_weighs_as_compel_does(engine, job):
    compel = image(engine, job("a (cat)1.5 on a [sofa]", prompt_weighting="compel"))
    sd_embeds = image(engine, job("a (cat:1.5) on a sofa", prompt_weighting="sdEmbeds"))
    assert difference(image(engine, job("a (cat:1.5) on a sofa", prompt_weighting="sdEmbeds")), sd_embeds) <= SAME
    assert difference(image(engine, job("a (cat)1.5 on a (sofa)0.9090909", prompt_weighting="compel")),
                      image(engine, job("a (cat:1.5) on a [sofa]", prompt_weighting="sdEmbeds"))) <= SAME
    assert difference(sd_embeds, compel) > 5


@pytest.mark.parametrize(("prompt", "fragments"), [
    ("(small) dog", [("small", 1.1), (" dog", 1.0)]),
    ("small dog, [pixar style]", [("small dog, ", 1.0), ("pixar style", 1 / 1.1)]),
    ("(small dog:1.5), pixar", [("small dog", 1.5), (", pixar", 1.0)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[(a:2)]", [("a", 2 / 1.1)]),
    (r"a \(b\) c", [("a (b) c", 1.0)]),
    ("(unclosed", [("unclosed", 1.1)]),
    ("stray) at 10:30", [("stray) at 10:30", 1.0)]),
])
def test_sd_embeds_syntax_reads_as_weighted_fragments(prompt, fragments):
    found = sd_embeds_fragments(prompt)
    assert [text for text, _ in found] == [text for text, _ in fragments]
    assert [weight for _, weight in found] == pytest.approx([weight for _, weight in fragments])


def test_weighted_prompts_batch_and_keep_each_prompt(engine, job):
    first, second = (job(prompt, seeds=(seed,), prompt_weighting="compel")
                     for prompt, seed in (("a (cat)1.4", 1), ("a very long " + "and winding " * 30 + "road", 2)))
    together = images(engine, first, second)
    assert difference(together[0], image(engine, first)) <= SAME
    assert difference(together[1], image(engine, second)) <= SAME


# ---------------------------------------------------------------- SDXL and its refiner


def test_the_refiner_finishes_what_the_sdxl_model_starts(engine, job):
    base = image(engine, job(model=TINY_SDXL, steps=6))
    refiner_weights = locate_weights(REFINER, data_dir=engine.pipelines.data_dir, allow_downloads=False)
    refined = image(engine, job(model=TINY_SDXL, steps=6, refiner=RefinerPass(REFINER, refiner_weights, 4 / 6)))
    later = image(engine, job(model=TINY_SDXL, steps=6, refiner=RefinerPass(REFINER, refiner_weights, 5 / 6)))
    assert refined.shape == (128, 128, 3)
    assert difference(refined, base) > 5 and difference(later, refined) > 2
    # The same again gives the same image; both models stayed loaded, the refiner beside the model.
    assert difference(image(engine, job(model=TINY_SDXL, steps=6,
                                        refiner=RefinerPass(REFINER, refiner_weights, 4 / 6))), refined) <= SAME
    assert {TINY_SDXL.air, REFINER.air} <= set(engine.pipelines.loaded_models)
    # With prompt weighting and CLIP skip, both models' text encoders take part.
    weighted = image(engine, job("a (red)1.4 fox", model=TINY_SDXL, steps=6, prompt_weighting="compel", clip_skip=1,
                                 refiner=RefinerPass(REFINER, refiner_weights, 4 / 6)))
    assert difference(weighted, refined) > 5


def test_sdxl_takes_weighted_prompts_like_plain_ones(engine, job):
    assert difference(image(engine, job("a red fox", model=TINY_SDXL, prompt_weighting="compel")),
                      image(engine, job("a red fox", model=TINY_SDXL))) <= SAME


def test_an_image_from_the_tiny_pair_is_an_image(engine, job):
    refiner_weights = locate_weights(REFINER, data_dir=engine.pipelines.data_dir, allow_downloads=False)
    made = Collect(1)
    engine.run([job(model=TINY_SDXL, seeds=(1, 2), refiner=RefinerPass(REFINER, refiner_weights, 0.5))], made)
    assert [result.seed for result in made.results[0]] == [1, 2]
    assert all(isinstance(result.image, Image.Image) and result.image.size == (128, 128)
               for result in made.results[0])
    # The refiner's steps continue the model's count: one progress scale for the whole job.
    assert [step.done for step in made.steps[0]] == list(range(1, len(made.steps[0]) + 1))
    assert made.steps[0][-1].done == made.steps[0][-1].total == 3


def test_a_loras_text_encoder_layers_switch_with_it(engine, job, add_on):
    pipe = engine.pipelines.text_to_image(TINY)
    ids = pipe.tokenizer(["a red fox"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def encoded() -> torch.Tensor:
        with torch.inference_mode():
            return pipe.text_encoder(ids)[0]

    image(engine, job())
    plain = encoded()
    image(engine, job(loras=(add_on(LORA),)))
    assert "text_encoder" in pipe.get_list_adapters() and not torch.allclose(encoded(), plain)
    image(engine, job())
    assert torch.equal(encoded(), plain)


def test_a_prompt_compel_cannot_read_fails_naming_the_prompt(engine, job):
    with pytest.raises(TaskError) as caught:
        image(engine, job('("a fox").blend(1, 2, 3)', prompt_weighting="compel"))
    assert (caught.value.code, caught.value.parameter) == ("invalidParameter", "positivePrompt")
    assert "compel syntax" in caught.value.message


# ---------------------------------------------------------------- with inpainting and ControlNet

TINY_INPAINT, CONTROLNET = (CATALOG.resolve(name) for name in ("tiny-inpaint", "tiny-controlnet"))


def edits(module_data_dir: Path, *, mask: bool = False, guide: bool = False) -> dict[str, Any]:
    """The fields of an inpainting job (a seed image and a mask over its left half) and of a ControlNet job."""
    fields: dict[str, Any] = {}
    if mask:
        seed = Image.new("RGB", (128, 128), (60, 120, 200))
        left = Image.new("L", (128, 128), 0)
        left.paste(255, (0, 0, 64, 128))
        fields.update(init_image=seed, mask_image=left, strength=1.0)
    if guide:
        from imagewire.tasks.jobs import ControlNetUse

        picture = Image.new("RGB", (128, 128))
        picture.paste((255, 255, 255), (32, 32, 96, 96))
        use = ControlNetUse(model=CONTROLNET, weights=locate_weights(CONTROLNET, data_dir=module_data_dir,
                                                                     allow_downloads=False),
                            weight=1.0, start=0.0, end=1.0, mode="balanced")
        fields.update(controlnets=(use,), guide_images=(picture,))
    return fields


@pytest.mark.parametrize(("model", "mask", "guide"), [
    (TINY, True, False),          # the inpainting view on the text-to-image model's modules
    (TINY_INPAINT, True, False),  # an inpainting checkpoint, which takes the LoRAs of the model it came from
    (TINY, False, True),          # a ControlNet view made after the LoRA went on
    (TINY, True, True),
])
def test_a_lora_applies_through_inpainting_and_controlnet_pipelines(engine, job, add_on, module_data_dir, model, mask,
                                                                   guide):
    fields = edits(module_data_dir, mask=mask, guide=guide)
    plain = image(engine, job(model=model, **fields))
    with_lora = image(engine, job(model=model, loras=(add_on(LORA, 1.0),), **fields))
    at_zero = image(engine, job(model=model, loras=(add_on(LORA, 0.0),), **fields))
    assert difference(with_lora, plain) > 20
    assert difference(at_zero, plain) <= SAME
    # And off again for the next plain call of the same pipelines.
    assert difference(image(engine, job(model=model, **fields)), plain) <= SAME
    if mask:  # pixels outside the mask are the runner's to paste back; inside, the LoRA shows
        assert difference(with_lora[:, :64], plain[:, :64]) > 20


def test_a_vae_and_an_embedding_apply_through_a_controlnet_view(engine, job, add_on, module_data_dir):
    fields = edits(module_data_dir, guide=True)
    prompt = "a photo of <tiny-embedding>"
    plain = image(engine, job(prompt, **fields))
    assert difference(image(engine, job(prompt, vae=add_on(VAE), **fields)), plain) > 20
    assert difference(image(engine, job(prompt, embeddings=(add_on(EMBEDDING),), **fields)), plain) > 20
    assert difference(image(engine, job(prompt, **fields)), plain) <= SAME


class CancelOnFirstStep(Collect):
    """Cancels job ``index`` when its first step is reported, as a client's cancelTask would mid-call."""

    def __init__(self, jobs: int, index: int) -> None:
        super().__init__(jobs)
        self.index = index

    def progress(self, index: int, step: Any) -> None:
        super().progress(index, step)
        if index == self.index:
            self.cancel.add(index)


def test_a_cancelled_call_stops_alone_and_the_runs_other_calls_go_on(engine, job):
    # Weighted prompts of two lengths (one over 77 tokens) make two calls of one chunk: cancelling the job of
    # the first call stops that call, and the second still makes its image.
    long_prompt = "a (red:1.2) fox " + "in the deep snow " * 30
    jobs = [job(long_prompt, prompt_weighting="sdEmbeds"), job("a (red:1.2) fox", prompt_weighting="sdEmbeds")]
    assert jobs[0].batch_key() == jobs[1].batch_key()
    made = CancelOnFirstStep(2, index=0)
    engine.run(jobs, made)
    assert made.results[0] == [] and len(made.results[1]) == 1
    assert len(made.steps[0]) == 1 and len(made.steps[1]) == made.steps[1][-1].total > 1
    assert difference(np.asarray(made.results[1][0].image).astype(int), image(engine, jobs[1])) <= SAME
    # The same across chunks: with one image per call, the second job's call still runs.
    engine.max_batch_size, size = 1, engine.max_batch_size
    try:
        made = CancelOnFirstStep(2, index=0)
        engine.run([job(seeds=(1,)), job(seeds=(2,))], made)
    finally:
        engine.max_batch_size = size
    assert made.results[0] == [] and len(made.results[1]) == 1
