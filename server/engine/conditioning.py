"""How prompts become text conditioning when a request asks for more than plain text: CLIP skip and weighted
prompts (``promptWeighting``).

- **CLIP skip** ``k`` runs the text encoders without their last ``k`` layers (``skipping_clip_layers``): the
  final layer norm then applies to the output of layer ``-(k + 1)``, exactly what diffusers' own ``clip_skip``
  computes for SD 1.x/2.x, and SDXL, which already reads its encoders' next-to-last layer, moves ``k`` layers
  further back as well. One mechanism, so that weighted and plain prompts skip the same way.
- **Weighted prompts** go through compel: the ``compel`` syntax (``(cat)1.5``, ``cat++``, ``.blend()``,
  ``.and()``) with compel's own parser; the ``sdEmbeds`` syntax (``(cat:1.5)``, ``(cat)``, ``[cat]``) is read by
  ``sd_embeds_fragments`` into the same weighted fragments. compel then encodes them per text encoder, long
  prompts in 77-token chunks, and the pipeline is called with ``prompt_embeds`` instead of prompts.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from compel import BaseTextualInversionManager, Compel, ReturnedEmbeddingsType
from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

from imagewire.tasks.errors import InvalidParameter

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# sdEmbeds: each pair of round brackets multiplies attention by 1.1, square ones divide by it.
_ATTENTION_STEP = 1.1
# An escaped bracket or backslash, an opening bracket, ":weight)" closing a weighted group, a closing bracket,
# a run of plain text, or a colon that is plain text.
_SD_EMBEDS_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?\d*\.?\d+)\s*\)|\)|]|[^\\()\[\]:]+|:|\\")


# Encoders that have run once with all their layers and hidden states asked for (see _ready_for_skipping).
_READY: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


@contextlib.contextmanager
def skipping_clip_layers(pipes: Sequence[Any], skip: int) -> Iterator[None]:
    """While inside, the text encoders of ``pipes`` run without their last ``skip`` layers."""
    if skip <= 0:
        yield
        return
    restore: list[tuple[Any, torch.nn.ModuleList]] = []
    try:
        for pipe in pipes:
            for name in _TEXT_ENCODERS:
                encoder = getattr(pipe, name, None)
                # transformers 5 flattens CLIPTextModel (no ``text_model``); older versions nest it.
                stack = getattr(encoder, "text_model", encoder).encoder if encoder is not None else None
                if stack is None or any(stack is done for done, _ in restore):
                    continue
                _ready_for_skipping(encoder)
                layers = stack.layers
                restore.append((stack, layers))
                stack.layers = torch.nn.ModuleList(list(layers)[: max(0, len(layers) - skip)])
        yield
    finally:
        for stack, layers in reversed(restore):
            stack.layers = layers


def _ready_for_skipping(encoder: Any) -> None:
    """Run the encoder once whole, asking for hidden states, before it first runs shortened: transformers 5
    collects hidden states with hooks that it puts on the layers it finds on the first such call, and layers
    left out then would never report theirs afterwards."""
    if encoder in _READY:
        return
    with torch.inference_mode():
        ids = torch.tensor([[0, 0]], device=encoder.device)
        encoder(ids, output_hidden_states=True)
    _READY.add(encoder)


def sd_embeds_fragments(prompt: str) -> list[tuple[str, float]]:
    """A prompt in sdEmbeds syntax as ``(text, weight)`` fragments: ``(a)`` ×1.1, ``[a]`` ÷1.1, ``(a:1.5)``
    ×1.5, nesting multiplies, ``\\(`` is a bracket; an unclosed bracket weighs to the end, a stray one is text.

    Each closing bracket multiplies everything since its opening one, so nesting needs no recursion.
    """
    fragments: list[list[Any]] = []   # [text, weight]
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open bracket's span starts

    def multiply(since: int, factor: float) -> None:
        for fragment in fragments[since:]:
            fragment[1] *= factor

    for match in _SD_EMBEDS_TOKEN.finditer(prompt):
        token, explicit = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token in opened:
            opened[token].append(len(fragments))
        elif explicit is not None and opened["("]:
            multiply(opened["("].pop(), float(explicit))
        elif token == ")" and opened["("]:
            multiply(opened["("].pop(), _ATTENTION_STEP)
        elif token == "]" and opened["["]:
            multiply(opened["["].pop(), 1 / _ATTENTION_STEP)
        else:
            fragments.append([token, 1.0])
    for since in opened["("]:
        multiply(since, _ATTENTION_STEP)
    for since in opened["["]:
        multiply(since, 1 / _ATTENTION_STEP)
    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if merged and abs(merged[-1][1] - weight) < 1e-9:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return [(text, weight) for text, weight in merged if text.strip()] or [("", 1.0)]


def _conjunction(prompt: str, syntax: str) -> Conjunction:
    if syntax == "sdEmbeds":
        return Conjunction([FlattenedPrompt([Fragment(text.strip(), weight)
                                             for text, weight in sd_embeds_fragments(prompt)])])
    try:
        return Compel.parse_prompt_string(prompt)
    except Exception as exc:  # pyparsing's errors, and compel's own
        raise InvalidParameter(
            f"positivePrompt or negativePrompt is not valid compel syntax ({type(exc).__name__}); see "
            "promptWeighting in the API reference, or send promptWeighting 'sdEmbeds' or none.",
            parameter="positivePrompt", type="string") from exc


def _plain_text(conjunction: Conjunction) -> str:
    """The words of a parsed prompt without its syntax: what the pooled embedding is made from."""
    parts: list[str] = []
    for prompt in conjunction.prompts:
        for fragment in getattr(prompt, "children", []):
            if isinstance(fragment, Fragment):
                parts.append(fragment.text)
    return " ".join(parts)


def weighted_prompt_arguments(pipe: Any, prompts: Sequence[str], negatives: Sequence[str | None],
                              syntax: str) -> dict[str, Any]:
    """The pipeline arguments that replace ``prompt`` and ``negative_prompt``: compel's weighted embeddings
    of each image's prompt and negative prompt, padded to one length."""
    pairs = [(getattr(pipe, tokenizer), getattr(pipe, encoder))
             for tokenizer, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
             if getattr(pipe, tokenizer, None) is not None and getattr(pipe, encoder, None) is not None]
    sdxl = hasattr(pipe, "text_encoder_2")
    # A missing negative prompt is the empty prompt, as in the pipeline's own encoding, except where an SDXL
    # model is configured to use zeros for it.
    zeros_for_empty = sdxl and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    texts = [*prompts, *(negative or "" for negative in negatives)]
    conjunctions = [_conjunction(text, syntax) for text in texts]
    per_encoder: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for index, (tokenizer, encoder) in enumerate(pairs):
        last = index == len(pairs) - 1
        compel = Compel(
            tokenizer=tokenizer, text_encoder=encoder, textual_inversion_manager=_MultiVectorTokens(tokenizer),
            truncate_long_prompts=False, device=str(pipe.device),
            returned_embeddings_type=(ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED if sdxl
                                      else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED))
        conditionings = [compel.build_conditioning_tensor_for_conjunction(conjunction)[0]
                         for conjunction in conjunctions]
        per_encoder.append(torch.cat(compel.pad_conditioning_tensors_to_same_length(conditionings)))
        if sdxl and last:
            # The pooled embedding comes from the last encoder, of the words without their weights.
            pooled = compel.conditioning_provider.get_pooled_embeddings([_plain_text(c) for c in conjunctions])
    length = max(embeds.shape[1] for embeds in per_encoder)
    per_encoder = [_pad_tokens(embeds, length) for embeds in per_encoder]
    embeds = torch.cat(per_encoder, dim=-1).to(pipe.dtype)
    count = len(prompts)
    positive, negative = embeds[:count], embeds[count:]
    arguments: dict[str, Any] = {"prompt_embeds": positive, "negative_prompt_embeds": negative}
    if pooled is not None:
        pooled = pooled.to(pipe.dtype)
        arguments["pooled_prompt_embeds"] = pooled[:count]
        arguments["negative_pooled_prompt_embeds"] = pooled[count:]
    if zeros_for_empty:
        for index, negative_prompt in enumerate(negatives):
            if not negative_prompt:
                arguments["negative_prompt_embeds"][index] = 0
                arguments["negative_pooled_prompt_embeds"][index] = 0
    return arguments


class _MultiVectorTokens(BaseTextualInversionManager):
    """An embedding of several vectors is its token and ``token_1``, ``token_2``, … in the tokenizer (how
    diffusers loads it); where a prompt has the token, compel gets all of them. Read from the tokenizer's
    added tokens, by id: no round trip through text."""

    def __init__(self, tokenizer: Any) -> None:
        added: dict[str, int] = tokenizer.get_added_vocab()
        self._expansions: dict[int, list[int]] = {}
        for token, token_id in added.items():
            more: list[int] = []
            while f"{token}_{len(more) + 1}" in added:
                more.append(added[f"{token}_{len(more) + 1}"])
            if more:
                self._expansions[token_id] = [token_id, *more]

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        return [expanded for token_id in token_ids for expanded in self._expansions.get(token_id, [token_id])]


def _pad_tokens(embeds: torch.Tensor, length: int) -> torch.Tensor:
    # Two encoders' chunkings can differ by a chunk when their tokenizers split a long prompt differently.
    if embeds.shape[1] == length:
        return embeds
    padding = embeds[:, -1:, :].expand(-1, length - embeds.shape[1], -1)
    return torch.cat([embeds, padding], dim=1)
