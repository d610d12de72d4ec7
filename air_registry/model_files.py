"""How models lie on disk: the files that make a diffusers folder, a single-file checkpoint, a hub
download. One place for names that the catalog, the weights lookup and the builders all read."""

from __future__ import annotations

# A folder in diffusers format has this index of its components.
MODEL_INDEX = "model_index.json"
SINGLE_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".ckpt", ".gguf")

# What a hub download fetches: the diffusers-format components only. Model repos also carry
# full-size single-file checkpoints, fp16 and non-EMA copies and a safety checker, many times the
# size of what the server loads.
HUB_INCLUDE: tuple[str, ...] = (MODEL_INDEX, "*/*.json", "*/*.txt", "*/*.safetensors")
HUB_EXCLUDE: tuple[str, ...] = ("*.fp16.*", "*non_ema*", "safety_checker/*")

# Model folders of the transformers library: a config.json beside the weights, tokenizer and processor
# files, and for some models (BiRefNet, RMBG) the Python code of their architecture. Older repos have
# only pytorch_model.bin weights, so those come too (repos with both formats are fetched with both).
TRANSFORMERS_CONFIG = "config.json"
TRANSFORMERS_HUB_INCLUDE: tuple[str, ...] = ("*.json", "*.txt", "*.safetensors", "*.bin", "*.py", "*.model",
                                             "*.tiktoken")
TRANSFORMERS_HUB_EXCLUDE: tuple[str, ...] = ("onnx/*", "*.onnx", "*.msgpack", "*.h5", "original/*", "training_args.bin")

# A single model saved on its own (a ControlNet, a safety checker): its config.json (and an image
# processor's) beside its weights. Catalog entries of these categories have this layout whatever their
# architecture, which names the checkpoints they fit (``ModelEntry.layout``).
COMPONENT_LAYOUT = "component"
COMPONENT_CONFIG = "config.json"
COMPONENT_HUB_INCLUDE: tuple[str, ...] = ("*.json", "*.safetensors")
COMPONENT_CATEGORIES: frozenset[str] = frozenset({"controlnet", "safety"})

# What a request adds to a checkpoint (catalog categories ``lora``, ``embeddings``, ``vae``) lies as: a VAE
# as a single model saved on its own (``component``); a LoRA or an embedding as one weights file, alone or in
# a folder or hub repo (``add_on_file``: diffusers' own name for it there, or else the only .safetensors file).
ADD_ON_FILE_LAYOUT = "add_on_file"
# An IP-Adapter is one weights file with an image encoder beside it (``ip_adapters.py``): a hub entry names the file.
ADD_ON_LAYOUTS = {"vae": COMPONENT_LAYOUT, "lora": ADD_ON_FILE_LAYOUT, "embeddings": ADD_ON_FILE_LAYOUT,
                  "ip-adapter": "weights_file"}
# The names diffusers gives a LoRA's and a textual-inversion embedding's weights file in a folder.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDDING_WEIGHTS = "learned_embeds.safetensors"
ADD_ON_FILE_NAMES = {"lora": LORA_WEIGHTS, "embeddings": EMBEDDING_WEIGHTS}

# What marks a complete model folder of each layout (``Architecture.layout``, ``ModelEntry.layout``); a
# ``weights_file`` model is its one file, an ``add_on_file`` one the file found as above.
LAYOUT_MARKERS = {"diffusers": MODEL_INDEX, "transformers": TRANSFORMERS_CONFIG, COMPONENT_LAYOUT: COMPONENT_CONFIG}
HUB_PATTERNS = {"diffusers": (HUB_INCLUDE, HUB_EXCLUDE),
                "transformers": (TRANSFORMERS_HUB_INCLUDE, TRANSFORMERS_HUB_EXCLUDE),
                COMPONENT_LAYOUT: (COMPONENT_HUB_INCLUDE, ()),
                ADD_ON_FILE_LAYOUT: (("*.safetensors",), ())}
WEIGHTS_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".ckpt")
