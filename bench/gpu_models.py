"""Full-size SD 1.5, SDXL, FLUX.1 [dev] and SD 3.5 large architectures with random weights, saved once
in diffusers format.

The configs in ``bench/model_configs`` carry the published shapes. Random weights cost exactly what
trained ones cost per step, so timings and memory are real while nothing is downloaded; the images
are noise. The tokenizers are the embedded models' self-built ones (byte-level CLIP, character
unigram T5): their ids stay far below ``vocab_size``, and text encoding is a negligible part of a
step's cost anyway.

``shrink`` keeps every block type and the VAE's factor of 8 but makes every width small, so the
whole path (build, save, catalog, load, serve) can be checked on a CPU in seconds.

On disk, in their CUDA precision: SD 1.5 2 GB, SDXL 7 GB, FLUX.1 [dev] 34 GB, SD 3.5 large 27 GB.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).with_name("model_configs")
ARCHITECTURES = ("sd15", "sdxl", "flux", "sd35")
# Configs without a pipeline of their own in the suites, for memory plans: SDXL's refiner.
PLAN_ONLY = ("sdxl_refiner",)
# The server's architecture (``air_registry/architectures.py``) each bench model is served as: its family
# adapter, its precision on CUDA.
SERVED_AS = {"sd15": "sd15", "sdxl": "sdxl", "flux": "flux1-dev", "sd35": "sd35-large"}
_TRANSFORMERS = {"FluxPipeline": "FluxTransformer2DModel", "StableDiffusion3Pipeline": "SD3Transformer2DModel"}
# addition_time_embed_dim is applied to six numbers in SDXL: original size, crop corner, target size.
_SDXL_TIME_IDS = 6


def load_config(architecture: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((CONFIG_DIR / f"{architecture}.json").read_text(encoding="utf-8"))
    return config


def _shrink_flow(config: dict[str, Any]) -> dict[str, Any]:
    """FLUX and SD 3 at a tiny width, every component kept (see ``air_registry/tiny`` for the layouts)."""
    small = copy.deepcopy(config)
    clips = [key for key, part in small.items() if isinstance(part, dict) and "hidden_size" in part]
    for key in clips:
        small[key].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          projection_dim=32)
    t5_key = "text_encoder_2" if config["pipeline"] == "FluxPipeline" else "text_encoder_3"
    t5_width = 32 if config["pipeline"] == "FluxPipeline" else 32 * len(clips)
    small[t5_key].update(d_model=t5_width, d_ff=64, d_kv=16, num_heads=2, num_layers=2)
    transformer = small["transformer"]
    if config["pipeline"] == "FluxPipeline":
        transformer.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                           joint_attention_dim=t5_width, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
    else:
        transformer.update(num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
                           joint_attention_dim=t5_width, pooled_projection_dim=32 * len(clips))
    small["vae"].update(block_out_channels=[32] * len(small["vae"]["block_out_channels"]), layers_per_block=1)
    return small


def shrink(config: dict[str, Any]) -> dict[str, Any]:
    """The same architecture at a tiny width: for checking the builder and the served path on a CPU."""
    if config["pipeline"] in _TRANSFORMERS:
        return _shrink_flow(config)
    small = copy.deepcopy(config)
    encoders = [key for key in ("text_encoder", "text_encoder_2") if key in small]
    for key in encoders:
        small[key].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          projection_dim=32)
    unet = small["unet"]
    blocks = len(unet["block_out_channels"])
    unet["block_out_channels"] = [32 * min(index + 1, 2) for index in range(blocks)]
    unet["layers_per_block"] = 1
    unet["attention_head_dim"] = [2] * blocks if isinstance(unet["attention_head_dim"], list) else 2
    if isinstance(unet.get("transformer_layers_per_block"), list):
        unet["transformer_layers_per_block"] = [1] * blocks
    unet["cross_attention_dim"] = 32 * len(encoders)
    if "addition_time_embed_dim" in unet:
        unet["addition_time_embed_dim"] = 8
        unet["addition_embed_type_num_heads"] = 2
        unet["projection_class_embeddings_input_dim"] = 32 + _SDXL_TIME_IDS * 8
    small["vae"].update(block_out_channels=[32] * len(small["vae"]["block_out_channels"]), layers_per_block=1)
    return small


def _text_encoder(config: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from imagewire.air_registry.tiny.tokenizers import END_TOKEN, START_TOKEN, build_clip_tokenizer

    vocab = build_clip_tokenizer().get_vocab()
    options = {key: value for key, value in config.items() if key != "class"}
    text_config = CLIPTextConfig(**options, bos_token_id=vocab[START_TOKEN], eos_token_id=vocab[END_TOKEN],
                                 pad_token_id=vocab[END_TOKEN])
    model_class = CLIPTextModelWithProjection if config.get("class") == "CLIPTextModelWithProjection" else CLIPTextModel
    return model_class(text_config)


def _t5_encoder(config: dict[str, Any]) -> Any:
    from transformers import T5Config, T5EncoderModel

    options = {key: value for key, value in config.items() if key != "class"}
    return T5EncoderModel(T5Config(**options, pad_token_id=0, eos_token_id=1))


def _build_flow_pipeline(config: dict[str, Any], scheduler: Any, *, device: str, dtype: Any, seed: int) -> Any:
    import diffusers
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from imagewire.air_registry.tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    transformer_class = getattr(diffusers, _TRANSFORMERS[config["pipeline"]])
    components: dict[str, Any] = {"scheduler": scheduler}
    # One component at a time, cast as soon as it is built: FLUX's transformer alone is 48 GB in float32.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        components["transformer"] = transformer_class(**config["transformer"]).to(dtype)
        components["vae"] = AutoencoderKL(**config["vae"]).to(dtype)
        for key in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if key not in config:
                continue
            tokenizer_key = key.replace("text_encoder", "tokenizer")
            if config[key].get("class") == "T5EncoderModel":
                components[key] = _t5_encoder(config[key]).to(dtype)
                components[tokenizer_key] = build_t5_tokenizer()
            else:
                components[key] = _text_encoder(config[key]).to(dtype)
                components[tokenizer_key] = build_clip_tokenizer()
    return getattr(diffusers, config["pipeline"])(**components)


def build_pipeline(config: dict[str, Any], *, device: str, dtype: Any, seed: int = 0) -> Any:
    """The pipeline of ``config`` with random weights, on ``device`` in ``dtype``.

    Weights are initialised on the target device (fast on a GPU) in float32, then cast.
    """
    import diffusers
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from imagewire.air_registry.tiny.tokenizers import build_clip_tokenizer

    scheduler_options = dict(config["scheduler"])
    scheduler = getattr(diffusers, scheduler_options.pop("class"))(**scheduler_options)
    if config["pipeline"] in _TRANSFORMERS:
        return _build_flow_pipeline(config, scheduler, device=device, dtype=dtype, seed=seed)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        components: dict[str, Any] = {
            "unet": UNet2DConditionModel(**config["unet"]).to(dtype),
            "vae": AutoencoderKL(**config["vae"]).to(dtype),
            "text_encoder": _text_encoder(config["text_encoder"]).to(dtype),
            "tokenizer": build_clip_tokenizer(),
            "scheduler": scheduler,
        }
        if "text_encoder_2" in config:
            components["text_encoder_2"] = _text_encoder(config["text_encoder_2"]).to(dtype)
            components["tokenizer_2"] = build_clip_tokenizer()
    pipeline_class = getattr(diffusers, config["pipeline"])
    if pipeline_class is diffusers.StableDiffusionPipeline:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipeline_class(**components)


def ensure_model(architecture: str, folder: Path, *, device: str, dtype: Any, small: bool = False) -> Path:
    """Build and save the model at ``folder`` unless a complete one is there already.

    Saved under a temporary name and renamed, so an interrupted build never looks complete.
    """
    if (folder / "model_index.json").is_file():
        return folder
    config = load_config(architecture)
    if small:
        config = shrink(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
    try:
        pipeline = build_pipeline(config, device=device, dtype=dtype)
        pipeline.save_pretrained(staging, safe_serialization=True)
        del pipeline
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters per saved component, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for weights in sorted(folder.glob("*/*.safetensors")):
        total = 0
        with safe_open(str(weights), framework="pt") as opened:
            for name in opened.keys():
                shape = opened.get_slice(name).get_shape()
                size = 1
                for dimension in shape:
                    size *= dimension
                total += size
        counts[weights.parent.name] = counts.get(weights.parent.name, 0) + total
    return counts


def catalog_entry(architecture: str, folder: Path, *, size: int, steps: int, strength: float) -> dict[str, Any]:
    """A ``--catalog`` entry serving ``folder`` (``source: folder``) so the served path is the real one."""
    return {
        "air": f"bench:{architecture}-random@1",
        "name": f"{architecture} architecture, random weights (benchmarks only)",
        "aliases": [f"bench-{architecture}"],
        "architecture": SERVED_AS[architecture],
        "category": "checkpoint",
        "tags": ["benchmark"],
        "source": "folder",
        "location": str(folder.resolve()),
        "defaults": {"width": size, "height": size, "steps": steps, "strength": strength},
    }


def _meta_component(key: str, config: dict[str, Any]) -> Any:
    import diffusers
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    part = config[key]
    if key == "unet":
        return UNet2DConditionModel(**part)
    if key == "transformer":
        return getattr(diffusers, _TRANSFORMERS[config["pipeline"]])(**part)
    if key == "vae":
        return AutoencoderKL(**part)
    return _t5_encoder(part) if part.get("class") == "T5EncoderModel" else _text_encoder(part)


@functools.cache
def meta_size(architecture: str, *, dtype_bytes: int = 2) -> Any:
    """The ``memory_plan.ModelSize`` of a full-size architecture, from its modules built on the meta device: real
    shapes and parameter counts without a byte of weights, in a few seconds."""
    import torch

    from imagewire.air_registry.memory_plan import sizes_from_headers

    config = load_config(architecture)
    components = {}
    with torch.device("meta"):
        for key in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if key in config:
                module = _meta_component(key, config)
                components[key] = {name: {"dtype": "BF16", "shape": list(tensor.shape)}
                                   for name, tensor in module.state_dict().items()}
    return sizes_from_headers(components, dtype_bytes)
