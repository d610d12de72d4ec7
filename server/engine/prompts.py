"""promptEnhance jobs on a causal language model.

Two styles, by family: ``causal-lm`` models made for Stable Diffusion prompts (MagicPrompt and the
like) continue the prompt, so a version is the prompt and what follows it on its line; ``chat-lm``
instruction models (Llama 3.1 Instruct) are asked, through their chat template, to rewrite it.

Each version is one sampled sequence under its own seed (torch's generator forked and seeded for it),
so a version depends on the request and the seed alone. Its length is held to ``promptMaxLength``
tokens of the model's tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from imagewire.air_registry import ARCHITECTURES
from imagewire.tasks.errors import InvalidParameter
from imagewire.tasks.jobs import Emit, GeneratedText
from imagewire.tasks.prompt_enhance import PromptJob

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine

# Draws a job may spend to find its versions distinct, per version asked for.
ATTEMPTS_PER_VERSION = 4
INSTRUCTION = (
    "You improve prompts for an image generator. Rewrite the user's prompt as one richer prompt: keep its "
    "subject, add concrete detail about the scene, style, lighting and composition. Answer with the prompt "
    "only, on one line, without quotes.")


def _load(path: Path, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()  # type: ignore[arg-type]
    return tokenizer, model


def run(engine: DiffusersEngine, jobs: Sequence[PromptJob], emit: Emit) -> None:
    tools = engine.tools
    for index, job in enumerate(jobs):  # prompt jobs never share a batch key; this runs one
        tokenizer, model = tools.get(job.model, job.weights, lambda path: _load(path, tools.device, tools.dtype))
        chat = ARCHITECTURES[job.model.architecture].family == "chat-lm"
        prompt_ids = _prompt_ids(tokenizer, job, chat=chat).to(tools.device)
        room = job.max_tokens if chat else job.max_tokens - _length(tokenizer, job.prompt)
        if room < 1:
            raise InvalidParameter(
                f"promptMaxLength {job.max_tokens} leaves no room to enhance a prompt of "
                f"{_length(tokenizer, job.prompt)} tokens; send a larger promptMaxLength or a shorter prompt.",
                parameter="promptMaxLength", type="integer")
        seen: list[str] = []
        spent = 0.0
        for attempt in range(job.versions * ATTEMPTS_PER_VERSION):
            started = time.perf_counter()
            tokens = _sample(model, tokenizer, prompt_ids, room, job.seed + attempt, tools.device)
            new = tokens[prompt_ids.shape[-1]:] if chat else tokens
            text = _fit(tokenizer, _one_line(tokenizer.decode(new, skip_special_tokens=True)), job.max_tokens)
            spent += time.perf_counter() - started
            if not text or text in seen:
                continue
            seen.append(text)
            emit(index, [GeneratedText(text, spent)])
            spent = 0.0
            if len(seen) == job.versions:
                break
        # A model that keeps repeating itself still answers every version asked for (clients count them).
        fallback = seen[-1] if seen else _fit(tokenizer, _one_line(job.prompt), job.max_tokens)
        for _ in range(job.versions - len(seen)):
            emit(index, [GeneratedText(fallback, spent)])
            spent = 0.0


def _prompt_ids(tokenizer: Any, job: PromptJob, *, chat: bool) -> torch.Tensor:
    if not chat:
        ids: torch.Tensor = tokenizer(job.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return ids
    messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": job.prompt}]
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return templated["input_ids"] if hasattr(templated, "keys") else templated


def _sample(model: Any, tokenizer: Any, prompt_ids: torch.Tensor, room: int, seed: int, device: str) -> torch.Tensor:
    cuda = torch.device(device)
    devices = [cuda.index if cuda.index is not None else torch.cuda.current_device()] if cuda.type == "cuda" else []
    end = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=True, top_k=50,
            top_p=0.95, max_new_tokens=room, pad_token_id=end if isinstance(end, int) else None)
    sequence: torch.Tensor = output[0]
    return sequence


def _length(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _one_line(text: str) -> str:
    """The first line, printable characters only (a random or byte-level model can make broken bytes)."""
    line = text.strip().split("\n", 1)[0].replace("\ufffd", "")
    return " ".join("".join(character for character in line if character.isprintable()).split())


def _fit(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut, a character at a time, until it is at most ``max_tokens`` tokens (cleaning can change
    how a text tokenizes, so the length is measured again)."""
    while text and _length(tokenizer, text) > max_tokens:
        text = text[:-1].rstrip()
    return text
