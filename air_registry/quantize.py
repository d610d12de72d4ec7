"""Quantization on load: a model's transformer and T5 encoder in weight-only int8 or float8, through torchao.

Chosen per catalog entry (``"quantize": "int8"``) or for every model by ``--quantize``. Weight-only: each linear
layer keeps its weights in one byte each with a scale per row, and computes in the model's precision; about
half the memory of bfloat16 weights for the two largest components of FLUX.1 and SD 3 (a 12B transformer, a 4.7B
T5), at a small cost in speed and image fidelity. UNet models (SD 1.x, 2.x, XL) are left as they are: their
memory is mostly convolutions, which weight-only quantization does not reach.

torchao's ``quantize_`` is applied to the modules once they are loaded, not diffusers' ``TorchAoConfig`` at
``from_pretrained``: one code path for every source (folders, single files, the transformer of a GGUF-free
single file, the pieces of a models folder), and for the T5 too, which transformers would need its own config
for. torchao is an optional extra (``imagewire[quantize]``); without it a model that asks for quantization
answers an error naming the extra.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from imagewire.air_registry.quantized import MissingExtra

logger = logging.getLogger(__name__)

QUANTIZE_EXTRA = "quantize"
QUANTIZE_INSTALL = "pip install 'imagewire[quantize]'"


class QuantizationUnsupported(MissingExtra):
    """torchao cannot run the asked quantization here (this device, this precision); the message says which."""


def _config(mode: str) -> Any:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return {"int8": Int8WeightOnlyConfig, "float8": Float8WeightOnlyConfig}[mode]()


def check_quantization(mode: str, *, device: str, dtype: Any, what: str) -> None:
    """Raise an error naming the extra without torchao, or saying what does not run when torchao cannot quantize
    (or run quantized) a linear layer in ``dtype`` on ``device``: found when the model loads, not in a call."""
    if importlib.util.find_spec("torchao") is None:
        raise MissingExtra(f"{what} is to be quantized to {mode} on load, which needs the '{QUANTIZE_EXTRA}' extra "
                           f"(torchao): install it with `{QUANTIZE_INSTALL}`, or load it with --quantize none")
    import torch
    from torchao.quantization import quantize_

    try:
        layer = torch.nn.Linear(64, 64, dtype=dtype, device=device)
        quantize_(layer, _config(mode))
        with torch.inference_mode():
            layer(torch.ones(2, 64, dtype=dtype, device=device))
    except Exception as exc:  # torchao raises what its kernels raise: each means it cannot run here
        raise QuantizationUnsupported(
            f"{what} cannot be quantized to {mode} here: torchao's weight-only {mode} does not run on {device} in "
            f"{str(dtype).removeprefix('torch.')} ({type(exc).__name__}: {str(exc)[:200]}); load it with --quantize "
            "none or another mode") from exc


def quantizable(pipe: Any) -> list[tuple[str, Any]]:
    """The components quantization on load quantizes: the transformer, and T5 encoders. A transformer read from a
    GGUF file is quantized already (its weights are ``GGUFParameter``) and is left as it is."""
    found = []
    for name, module in pipe.components.items():
        if name == "transformer" or type(module).__name__ == "T5EncoderModel":
            if any(type(parameter).__name__ == "GGUFParameter" for parameter in module.parameters()):
                continue
            found.append((name, module))
    return found


def quantize_pipeline(pipe: Any, mode: str) -> list[str]:
    """Quantize ``pipe``'s transformer and T5 encoders to ``mode`` (int8 or float8) in place, weight-only; the
    names of the components quantized."""
    from torchao.quantization import quantize_

    done = []
    for name, module in quantizable(pipe):
        quantize_(module, _config(mode))
        done.append(name)
    return done
