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


# ---------------------------------------------------------------- the flow-matching models: FLUX and SD 3.5

FLOW_BUILDS = {
    "tiny-flux": ("imagewire-tiny-flux-1", "FluxPipeline", ["text_encoder", "text_encoder_2", "transformer", "vae"]),
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
    t5 = pipe.text_encoder_2 if builder == "tiny-flux" else pipe.text_encoder_3
    t5_tokenizer = pipe.tokenizer_2 if builder == "tiny-flux" else pipe.tokenizer_3
    assert type(t5).__name__ == "T5EncoderModel"
    assert type(pipe.text_encoder).__name__.startswith("CLIPTextModel")
    assert pipe.transformer.config.joint_attention_dim == t5.config.d_model
    if builder == "tiny-flux":
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
