"""The flow-matching families (FLUX, SD 3) on the diffusers engine, with the embedded tiny models:
what reaches the pipeline changes the image where it must, batching leaves each image its own, and
every flow-matching sampler runs text-to-image and image-to-image."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from imagewire.air_registry import FLOW, FLOW_SAMPLERS, Catalog, resolve_sampler
from imagewire.air_registry.weights import locate_weights
from imagewire.server.device import Cancelled
from imagewire.server.engine import DiffusersEngine
from imagewire.tasks.jobs import GeneratedImage, InferenceJob, Step
from tests.engines import Collect, diffusers_engine
from tests.images import difference

CATALOG = Catalog.load()
FLOW_MODELS = ["imagewire:tiny-flux@1", "imagewire:tiny-sd3@1"]
RED = Image.new("RGB", (128, 128), (220, 30, 30))
BLUE = Image.new("RGB", (128, 128), (30, 30, 220))

JobMaker = Callable[..., InferenceJob]


@pytest.fixture(scope="module")
def engine(module_data_dir: Path) -> DiffusersEngine:
    return diffusers_engine(module_data_dir)


@pytest.fixture(params=FLOW_MODELS, ids=["flux", "sd3"])
def job(request: pytest.FixtureRequest, engine: DiffusersEngine) -> JobMaker:
    model = CATALOG.resolve(request.param)
    weights = locate_weights(model, data_dir=engine.pipelines.data_dir, allow_downloads=False)

    def make(name: str, prompt: str, seeds: list[int], **changes: object) -> InferenceJob:
        made = InferenceJob(task_uuid=name, model=model, weights=weights, prompt=prompt, negative_prompt=None,
                            width=128, height=128, steps=4, cfg_scale=3.5, sampler=None, seeds=seeds,
                            strength=0.6)
        return dataclasses.replace(made, **changes)

    return make


def run(engine: DiffusersEngine, jobs: list[InferenceJob]) -> dict[str, list[GeneratedImage]]:
    collected = Collect(len(jobs))
    engine.run(jobs, collected)
    made: dict[str, list[GeneratedImage]] = {job.task_uuid: [] for job in jobs}
    for index, job in enumerate(jobs):
        made[job.task_uuid].extend(collected.results[index])
    return made


def one(engine: DiffusersEngine, job: InferenceJob) -> Image.Image:
    return run(engine, [job])[job.task_uuid][0].image



# Batched maths may differ from unbatched in the last bit; anything the request changes moves pixels
# by far more.
ROUNDING = 2


@pytest.mark.parametrize("image_to_image", [False, True], ids=["txt2img", "img2img"])
def test_jobs_sharing_a_call_get_the_images_they_would_get_alone(engine, job, image_to_image):
    seed_images = {"a": {"init_image": RED}, "b": {"init_image": BLUE}} if image_to_image else {"a": {}, "b": {}}
    first, second = job("a", "a red fox", [5], **seed_images["a"]), job("b", "a blue bird", [9, 10], **seed_images["b"])
    together = run(engine, [first, second])
    alone = {**run(engine, [first]), **run(engine, [second])}
    assert [image.seed for image in together["a"]] == [5] and [image.seed for image in together["b"]] == [9, 10]
    for name in ("a", "b"):
        for shared, single in zip(together[name], alone[name], strict=True):
            assert shared.image.size == (128, 128)
            assert difference(shared.image, single.image) <= ROUNDING
    assert difference(together["a"][0].image, together["b"][0].image) > ROUNDING


def test_seed_prompt_and_guidance_reach_the_pipeline(engine, job):
    base = one(engine, job("x", "a lighthouse at dawn", [42]))
    assert difference(base, one(engine, job("x", "a lighthouse at dawn", [42]))) == 0
    assert difference(base, one(engine, job("x", "a lighthouse at dawn", [43]))) > ROUNDING
    assert difference(base, one(engine, job("x", "a harbour at night", [42]))) > ROUNDING
    # FLUX [dev]'s own guidance embedding and SD 3's classifier-free guidance both follow CFGScale.
    assert difference(base, one(engine, job("x", "a lighthouse at dawn", [42], cfg_scale=7.0))) > ROUNDING


def test_the_seed_image_and_strength_reach_the_pipeline(engine, job):
    red = one(engine, job("x", "a meadow", [3], init_image=RED))
    assert red.size == (128, 128)
    assert difference(red, one(engine, job("x", "a meadow", [3], init_image=BLUE))) > ROUNDING
    assert difference(red, one(engine, job("x", "a meadow", [3], init_image=RED, strength=0.3))) > ROUNDING


def test_a_negative_prompt_guides_sd3_and_is_ignored_by_flux(engine, job):
    base = one(engine, job("x", "a lighthouse", [8]))
    negative = one(engine, job("x", "a lighthouse", [8], negative_prompt="fog, rain"))
    if job("x", "", [0]).model.architecture == "tiny-flux":
        assert difference(base, negative) == 0
    else:
        assert difference(base, negative) > ROUNDING


@pytest.mark.parametrize("name", sorted(FLOW_SAMPLERS))
def test_every_flow_matching_sampler_runs_both_ways(engine, job, name):
    spec = resolve_sampler(name, FLOW)
    assert spec is not None
    own = one(engine, job("x", "a red fox", [1], init_image=RED))
    text = one(engine, job("x", "a red fox", [1], sampler=spec))
    image = one(engine, job("x", "a red fox", [1], sampler=spec, init_image=RED))
    assert text.size == image.size == (128, 128)
    if any(spec.options.values()):
        # Karras, Beta or Exponential sigmas: another schedule, another image.
        assert difference(image, own) > ROUNDING
    else:
        # Plain flow-matching Euler is what these models sample with by default.
        assert difference(image, own) <= ROUNDING


def test_flux_kontext_edits_the_seed_image_with_its_own_pipeline(engine, tmp_path):
    """Kontext [dev]'s code path, on the tiny FLUX weights (Kontext has FLUX.1's components)."""
    import json

    from imagewire.air_registry.tiny import ensure_embedded

    folder = ensure_embedded("tiny-flux", engine.pipelines.data_dir / "models" / "imagewire-tiny-flux-1")
    catalog_file = tmp_path / "kontext.json"
    catalog_file.write_text(json.dumps([{"air": "test:kontext@1", "name": "Kontext on tiny FLUX",
                                         "architecture": "flux1-kontext", "source": "folder",
                                         "location": str(folder)}]))
    model = Catalog.load([catalog_file]).resolve("test:kontext@1")
    weights = locate_weights(model, data_dir=engine.pipelines.data_dir, allow_downloads=False)

    def kontext(**changes: object) -> InferenceJob:
        made = InferenceJob(task_uuid="k", model=model, weights=weights, prompt="make it night", negative_prompt=None,
                            width=128, height=128, steps=2, cfg_scale=2.5, sampler=None, seeds=[4], strength=0.6)
        return dataclasses.replace(made, **changes)

    assert type(engine.pipelines.text_to_image(model, weights)).__name__ == "FluxKontextPipeline"
    assert one(engine, kontext()).size == (128, 128)
    red, blue = one(engine, kontext(init_image=RED)), one(engine, kontext(init_image=BLUE))
    assert red.size == (128, 128)
    assert difference(red, blue) > ROUNDING
    # The whole seed image is Kontext's reference: strength has nothing to say.
    assert difference(red, one(engine, kontext(init_image=RED, strength=0.9))) == 0
    together = run(engine, [kontext(init_image=RED), dataclasses.replace(kontext(init_image=BLUE), task_uuid="b")])
    assert difference(together["k"][0].image, red) <= ROUNDING
    assert difference(together["b"][0].image, blue) <= ROUNDING


def test_a_mask_reaches_the_flow_models_inpainting_pipelines(engine, job):
    """FLUX and SD 3 repaint through the inpainting pipelines diffusers derives from their weights."""
    first = job("x", "a meadow", [3])
    inpainting = engine.pipelines.inpainting(first.model, first.weights)
    assert type(inpainting).__name__ in ("FluxInpaintPipeline", "StableDiffusion3InpaintPipeline")
    left, right = Image.new("L", (128, 128), 0), Image.new("L", (128, 128), 0)
    left.paste(255, (0, 0, 64, 128))
    right.paste(255, (64, 0, 128, 128))

    def repainted(mask: Image.Image | None) -> Image.Image:
        return one(engine, job("x", "a meadow", [3], init_image=RED, mask_image=mask))

    masked = repainted(left)
    assert masked.size == (128, 128)
    assert difference(masked, repainted(left)) == 0
    assert difference(repainted(None), masked) > ROUNDING
    assert difference(masked, repainted(right)) > ROUNDING


def test_flux_fill_repaints_through_its_own_pipeline(engine, tmp_path):
    """FLUX.1 Fill [dev]'s code path: the tiny FLUX components around a transformer that also reads the
    masked image and the mask, as Fill's does, saved as a folder and catalogued as ``flux1-fill``."""
    import inspect
    import json

    import torch
    from diffusers import FluxFillPipeline
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    from imagewire.air_registry.tiny import flux as tiny_flux
    from imagewire.air_registry.tiny.tokenizers import write_clip_vocabulary

    base = tiny_flux.build_tiny_pipeline()
    packed = base.vae.config.latent_channels * 4  # 2×2 patches of the latents
    shape = {name: value for name, value in base.transformer.config.items() if not name.startswith("_")}
    # The latents, the masked image's latents and the mask (one channel per pixel of a latent's patch).
    shape.update(in_channels=2 * packed + base.vae_scale_factor ** 2 * 4, out_channels=packed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        transformer = FluxTransformer2DModel(**shape)
    takes = inspect.signature(FluxFillPipeline.__init__).parameters
    fill = FluxFillPipeline(**{**{name: module for name, module in base.components.items() if name in takes},
                               "transformer": transformer})
    folder = tmp_path / "fill"
    fill.save_pretrained(folder, safe_serialization=True)
    write_clip_vocabulary(folder / "tokenizer")
    catalog_file = tmp_path / "fill.json"
    catalog_file.write_text(json.dumps([{"air": "test:fill@1", "name": "Fill on tiny FLUX",
                                         "architecture": "flux1-fill", "source": "folder",
                                         "location": str(folder)}]))
    model = Catalog.load([catalog_file]).resolve("test:fill@1")
    weights = locate_weights(model, data_dir=engine.pipelines.data_dir, allow_downloads=False)
    left, right = Image.new("L", (128, 128), 0), Image.new("L", (128, 128), 0)
    left.paste(255, (0, 0, 64, 128))
    right.paste(255, (64, 0, 128, 128))

    def filled(mask: Image.Image, seed_image: Image.Image = RED) -> Image.Image:
        return one(engine, InferenceJob(
            task_uuid="f", model=model, weights=weights, prompt="a window", negative_prompt=None, width=128,
            height=128, steps=2, cfg_scale=30.0, sampler=None, seeds=[6], init_image=seed_image, strength=1.0,
            mask_image=mask))

    assert type(engine.pipelines.inpainting(model, weights)).__name__ == "FluxFillPipeline"
    red = filled(left)
    assert red.size == (128, 128)
    assert difference(red, filled(left)) == 0
    assert difference(red, filled(right)) > ROUNDING
    assert difference(red, filled(left, BLUE)) > ROUNDING


class _CancelAtFirstStep(Collect):
    """Cancels every job as soon as it reports a step."""

    def progress(self, index: int, step: Step) -> None:
        super().progress(index, step)
        self.cancel.add(index)


@pytest.mark.parametrize("image_to_image", [False, True], ids=["txt2img", "img2img"])
def test_flow_pipelines_report_every_step_and_stop_when_cancelled(engine, job, image_to_image):
    seed_image = {"init_image": RED, "strength": 0.5} if image_to_image else {}
    steps = 2 if image_to_image else 4  # strength 0.5 runs half of the 4 steps
    collected = Collect(1)
    engine.run([job("x", "a fox", [1], **seed_image)], collected)
    assert [(step.indexes, step.done, step.total) for step in collected.steps[0]] == [
        ((0,), done, steps) for done in range(1, steps + 1)]
    assert len(collected.results[0]) == 1
    stopping = _CancelAtFirstStep(1)
    with pytest.raises(Cancelled):
        engine.run([job("x", "a fox", [1], **seed_image)], stopping)
    assert [step.done for step in stopping.steps[0]] == [1] and stopping.results == [[]]


@pytest.mark.gpu
@pytest.mark.parametrize("air", FLOW_MODELS)
def test_flow_models_run_in_bfloat16_on_cuda_and_batch_as_alone(module_data_dir, air):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cuda = diffusers_engine(module_data_dir, device="cuda")
    model = CATALOG.resolve(air)
    weights = locate_weights(model, data_dir=module_data_dir, allow_downloads=False)
    pipe = cuda.pipelines.text_to_image(model, weights)
    assert pipe.transformer.dtype == torch.bfloat16
    jobs = [InferenceJob(task_uuid=name, model=model, weights=weights, prompt=prompt, negative_prompt=None,
                         width=256, height=256, steps=4, cfg_scale=3.5, sampler=None, seeds=[seed])
            for name, prompt, seed in (("a", "a red fox", 1), ("b", "a blue bird", 2))]
    together = run(cuda, jobs)
    for job in jobs:
        alone = run(cuda, [job])[job.task_uuid][0].image
        # bfloat16 batched maths round differently from unbatched: a few levels, not a different image.
        assert difference(together[job.task_uuid][0].image, alone) <= 8
