from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline

from imagewire.air_registry.tiny import ensure_embedded
from imagewire.air_registry.tiny.tokenizers import build_clip_tokenizer
from tests.timing import seconds

REPO_ROOT = Path(__file__).resolve().parents[2]

WEIGHT_FILES = [
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]


def test_two_builds_write_identical_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = ensure_embedded("tiny-sd", tmp_path / "again" / "imagewire-tiny-1")
    for name in WEIGHT_FILES:
        assert (other / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "model_index.json").read_text() == (tiny_model_dir / "model_index.json").read_text()


def test_building_leaves_the_callers_random_state_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    ensure_embedded("tiny-sd", tmp_path / "model")
    assert torch.equal(torch.rand(3), expected)


def test_an_existing_model_is_not_rebuilt(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / WEIGHT_FILES[1]
    before = weights.stat().st_mtime_ns
    assert ensure_embedded("tiny-sd", tiny_model_dir) == tiny_model_dir
    assert weights.stat().st_mtime_ns == before


@pytest.mark.parametrize("builder", ["tiny-controlnet", "tiny-safety", "tiny-upscaler"])
def test_a_model_of_another_layout_is_not_rebuilt_either(builder: str, tmp_path: Path) -> None:
    target = ensure_embedded(builder, tmp_path / builder)
    files = {path: path.stat().st_mtime_ns for path in target.rglob("*") if path.is_file()}
    assert files and not (target / "model_index.json").exists()
    assert ensure_embedded(builder, target) == target
    assert {path: path.stat().st_mtime_ns for path in target.rglob("*") if path.is_file()} == files


def test_an_incomplete_directory_is_replaced_and_no_temporary_files_remain(tmp_path: Path) -> None:
    target = tmp_path / "models" / "imagewire-tiny-1"
    (target / "unet").mkdir(parents=True)
    (target / "unet" / "half-written.safetensors").write_bytes(b"partial")
    ensure_embedded("tiny-sd", target)
    assert (target / "model_index.json").is_file()
    assert not (target / "unet" / "half-written.safetensors").exists()
    assert sorted(path.name for path in target.parent.iterdir()) == ["imagewire-tiny-1"]


def test_concurrent_builds_leave_one_complete_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "models" / "imagewire-tiny-1"
    errors: list[BaseException] = []

    def build() -> None:
        try:
            ensure_embedded("tiny-sd", target)
        except BaseException as exc:  # collected and re-raised by the test
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(path.name for path in target.parent.iterdir()) == ["imagewire-tiny-1"]
    for name in WEIGHT_FILES:
        assert (target / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    StableDiffusionPipeline.from_pretrained(target)


def test_separate_processes_build_the_same_model_into_one_place(tiny_model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "models" / "imagewire-tiny-1"
    code = (
        "import sys, pathlib\n"
        "from imagewire.air_registry.tiny import ensure_embedded\n"
        "ensure_embedded('tiny-sd', pathlib.Path(sys.argv[1]))\n"
    )
    builders = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(target)], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for builder in builders:
        _, errors = builder.communicate(timeout=seconds(120))
        assert builder.returncode == 0, errors
    assert sorted(path.name for path in target.parent.iterdir()) == ["imagewire-tiny-1"]
    for name in WEIGHT_FILES:
        assert (target / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_the_saved_model_is_a_standard_sd_pipeline(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["requires_safety_checker"] is False
    # The classic tokenizer files are there for other tools and library versions.
    assert (tiny_model_dir / "tokenizer" / "vocab.json").is_file()
    assert (tiny_model_dir / "tokenizer" / "merges.txt").read_text().startswith("#version")


@pytest.mark.parametrize("loader", [StableDiffusionPipeline, AutoPipelineForText2Image])
def test_it_loads_offline_with_the_real_latent_scale(tiny_model_dir: Path, loader: Any) -> None:
    pipe = loader.from_pretrained(tiny_model_dir)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae_scale_factor == 8
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.safety_checker is None
    # Small enough for a CPU: about a million parameters in all.
    parameters = sum(
        p.numel() for module in (pipe.unet, pipe.vae, pipe.text_encoder) for p in module.parameters()
    )
    assert parameters < 2_000_000


@pytest.mark.parametrize(
    "prompt", ["a photo of a cat", "", "東京の夜景, 🐱 ünïcödé", "x" * 500, "<|endoftext|> tricky"]
)
def test_any_prompt_tokenizes_within_the_vocabulary(prompt: str) -> None:
    tokenizer = build_clip_tokenizer()
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert max(ids) < len(tokenizer)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|startoftext|>")


# ---------------------------------------------------------------- the other embedded models

EMBEDDED = {  # builder → the files it writes
    "tiny-lora": ["pytorch_lora_weights.safetensors"],
    "tiny-embedding": ["learned_embeds.safetensors"],
    "tiny-vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "tiny-sdxl": ["model_index.json", "unet/diffusion_pytorch_model.safetensors",
                  "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"],
    "tiny-sdxl-refiner": ["model_index.json", "unet/diffusion_pytorch_model.safetensors",
                          "text_encoder_2/model.safetensors"],
}


@pytest.mark.parametrize("builder", sorted(EMBEDDED))
def test_every_embedded_model_builds_the_same_bytes_twice(models_dir: Path, tmp_path: Path, builder: str) -> None:
    shipped = models_dir / f"imagewire-{builder}-1"
    again = ensure_embedded(builder, tmp_path / builder)
    for name in EMBEDDED[builder]:
        assert (again / name).read_bytes() == (shipped / name).read_bytes(), name
    # Built once, it is found complete by its own file and not rebuilt.
    before = (again / EMBEDDED[builder][0]).stat().st_mtime_ns
    ensure_embedded(builder, again)
    assert (again / EMBEDDED[builder][0]).stat().st_mtime_ns == before


def test_the_tiny_lora_is_a_diffusers_peft_lora_file_for_the_tiny_unet(models_dir: Path, tiny_model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(models_dir / "imagewire-tiny-lora-1" / "pytorch_lora_weights.safetensors"), "pt") as file:
        keys = set(file.keys())
        shapes = {key: tuple(file.get_slice(key).get_shape()) for key in keys}
    assert keys and all(key.startswith(("unet.", "text_encoder.")) and (".lora_A." in key or ".lora_B." in key)
                        for key in keys)
    # Every attention projection of the tiny UNet and of its text encoder, as pairs of low-rank factors.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    projections = {name for name, _ in pipe.unet.named_modules()
                   if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")}
    text_projections = {name for name, _ in pipe.text_encoder.named_modules()
                        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")}
    modules = {key.rsplit(".lora_", 1)[0] for key in keys}
    assert {name.removeprefix("unet.") for name in modules if name.startswith("unet.")} == projections
    assert {name.removeprefix("text_encoder.") for name in modules if name.startswith("text_encoder.")} \
        == text_projections
    key = next(iter(sorted(keys)))
    a, b = key.replace("lora_B", "lora_A"), key.replace("lora_A", "lora_B")
    assert shapes[a][0] == shapes[b][1] == 4  # rank 4


def test_the_tiny_embedding_is_two_vectors_for_one_token_in_diffusers_format(models_dir: Path) -> None:
    from safetensors.torch import load_file

    vectors = load_file(str(models_dir / "imagewire-tiny-embedding-1" / "learned_embeds.safetensors"))
    assert list(vectors) == ["<tiny-embedding>"]
    assert tuple(vectors["<tiny-embedding>"].shape) == (2, 32)  # the tiny text encoder's width


def test_the_tiny_vae_fits_the_tiny_model_with_other_weights(models_dir: Path, tiny_model_dir: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(models_dir / "imagewire-tiny-vae-1")
    own = AutoencoderKL.from_pretrained(tiny_model_dir / "vae")
    assert vae.config.block_out_channels == own.config.block_out_channels
    assert vae.config.latent_channels == own.config.latent_channels == 4
    assert not torch.equal(vae.decoder.conv_out.weight, own.decoder.conv_out.weight)


def test_the_tiny_sdxl_pair_is_shaped_like_sdxl_base_and_refiner(models_dir: Path) -> None:
    from diffusers import AutoPipelineForImage2Image, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = AutoPipelineForText2Image.from_pretrained(models_dir / "imagewire-tiny-sdxl-1")
    refiner = AutoPipelineForImage2Image.from_pretrained(models_dir / "imagewire-tiny-sdxl-refiner-1")
    assert isinstance(base, StableDiffusionXLPipeline) and isinstance(refiner, StableDiffusionXLImg2ImgPipeline)
    # Two text encoders side by side for the base; the refiner has the second only, and an aesthetic score.
    assert base.unet.config.cross_attention_dim == 2 * base.text_encoder.config.hidden_size
    assert base.unet.config.addition_embed_type == "text_time"
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score is True
    assert refiner.unet.config.cross_attention_dim == refiner.text_encoder_2.config.hidden_size
    # They share the second text encoder and the VAE (one latent space), and nothing else.
    for name, parameter in base.text_encoder_2.state_dict().items():
        assert torch.equal(parameter, refiner.text_encoder_2.state_dict()[name])
    assert torch.equal(base.vae.decoder.conv_out.weight, refiner.vae.decoder.conv_out.weight)
    assert base.vae.config.scaling_factor == 0.13025
    # Three text-encoder layers: every clipSkip value leaves some.
    assert base.text_encoder.config.num_hidden_layers == base.text_encoder_2.config.num_hidden_layers == 3


# ---------------------------------------------------------------- the flow-matching models: FLUX and SD 3.5

FLOW_BUILDS = {
    "tiny-flux": ("imagewire-tiny-flux-1", "FluxPipeline", ["text_encoder", "text_encoder_2", "transformer", "vae"]),
    "tiny-flux-kontext": ("imagewire-tiny-flux-kontext-1", "FluxKontextPipeline",
                          ["text_encoder", "text_encoder_2", "transformer", "vae"]),
    "tiny-sd3": ("imagewire-tiny-sd3-1", "StableDiffusion3Pipeline",
                 ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]),
}


@pytest.fixture(scope="module", params=sorted(FLOW_BUILDS))
def flow_build(request: pytest.FixtureRequest, tiny_data_dir: Path) -> tuple[str, Path]:
    builder = request.param
    return builder, ensure_embedded(builder, tiny_data_dir / "models" / FLOW_BUILDS[builder][0])


def weight_files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.glob("*/*.safetensors"))}


def test_flow_models_build_identically_every_time(flow_build: tuple[str, Path], tmp_path: Path) -> None:
    builder, folder = flow_build
    again = ensure_embedded(builder, tmp_path / "again")
    assert weight_files(again) == weight_files(folder)
    assert sorted({name.split("/")[0] for name in weight_files(folder)}) == FLOW_BUILDS[builder][2]


def test_flow_models_have_every_component_of_the_real_architecture(flow_build: tuple[str, Path]) -> None:
    builder, folder = flow_build
    pipe: Any = AutoPipelineForText2Image.from_pretrained(folder)
    assert type(pipe).__name__ == FLOW_BUILDS[builder][1]
    # The 16-channel VAE with the latent scale factor of 8, and the flow-matching sampler.
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    flux = builder.startswith("tiny-flux")
    t5 = pipe.text_encoder_2 if flux else pipe.text_encoder_3
    t5_tokenizer = pipe.tokenizer_2 if flux else pipe.tokenizer_3
    assert type(t5).__name__ == "T5EncoderModel"
    assert type(pipe.text_encoder).__name__.startswith("CLIPTextModel")
    assert pipe.transformer.config.joint_attention_dim == t5.config.d_model
    if flux:
        assert pipe.transformer.config.in_channels == 16 * 4  # 2×2 patches of 16 channels
        assert pipe.transformer.config.guidance_embeds  # FLUX.1 [dev]'s guidance embedding
        assert pipe.scheduler.config.use_dynamic_shifting
    else:
        assert pipe.transformer.config.in_channels == 16 and pipe.transformer.config.patch_size == 2
        assert pipe.transformer.config.pooled_projection_dim == 2 * pipe.text_encoder.config.projection_dim
    ids = t5_tokenizer("a photo, 東京 🐱", padding="max_length", max_length=32, truncation=True).input_ids
    assert len(ids) == 32 and max(ids) < t5.config.vocab_size
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    assert parameters < 500_000


def test_the_tiny_kontext_is_the_tiny_flux_as_a_kontext_pipeline(tiny_data_dir: Path) -> None:
    # Kontext [dev] has [dev]'s components exactly; only the pipeline that runs them differs.
    flux = ensure_embedded("tiny-flux", tiny_data_dir / "models" / FLOW_BUILDS["tiny-flux"][0])
    kontext = ensure_embedded("tiny-flux-kontext", tiny_data_dir / "models" / FLOW_BUILDS["tiny-flux-kontext"][0])
    assert weight_files(kontext) == weight_files(flux)
    assert '"_class_name": "FluxKontextPipeline"' in (kontext / "model_index.json").read_text()


def test_the_t5_tokenizer_reads_back_as_it_was_built(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from imagewire.air_registry.tiny.tokenizers import build_t5_tokenizer

    built = build_t5_tokenizer()
    built.save_pretrained(tmp_path)
    read = AutoTokenizer.from_pretrained(tmp_path)
    for prompt in ["a castle on a hill", "", "ünïcödé, 東京", "x" * 600]:
        assert read(prompt).input_ids == built(prompt).input_ids
    ids = built("ab c").input_ids
    assert built.convert_ids_to_tokens(ids) == ["\u2581", "a", "b", "\u2581", "c", "</s>"]
