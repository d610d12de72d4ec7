"""Step caches around one pipeline call: DeepCache on a UNet, First Block Cache on a transformer.

``caching(pipe, settings)`` puts the cache's hooks on the pipeline's denoiser for one call and takes every one
of them off afterwards, however the call ends, so the cached pipeline is as loaded for the next job. The hooks
are diffusers' own mechanism (``diffusers.hooks.HookRegistry``), which chains with the other hooks a model may
carry (offloading).

Which steps may reuse is decided from a ``StepClock`` that the pipeline's step-end callback advances: the
pipelines count their steps differently (PNDM runs one more), and only the callback fires once per step in
every one of them.

**DeepCache** (Ma et al., 2023) on diffusers' ``UNet2DConditionModel``. The UNet's skip connections are its
branches, numbered from the shallowest (0: ``conv_in``'s output, taken back by the last up layer). With branch
b, the down layers that make skips 1…b and the up layers that take skips b…0 run on every step; every layer
deeper than that (the mid block included) runs only on full steps, and on the steps between hands back what
it gave on the last full step, so the first shallow up layer takes the cached deep feature with a fresh skip
connection, as in the paper. The deeper down layers' skips only reach deeper up layers, which do not run, but
the up blocks count them out by number, so the kept ones are handed back too. A ControlNet still runs every
step (its residuals add to the kept skips, to no effect on the layers that replay).

**First Block Cache** (``diffusers.hooks.first_block_cache``) on FLUX and SD 3 transformers: diffusers ships it
for every transformer block type of these families, and it is the TeaCache idea (skip a step when the model's
input to its blocks barely changed) without TeaCache's per-model fitted polynomial, which diffusers does not
ship for these models and which would need fitting to every checkpoint. MagCache needs per-model calibration
too; TaylorSeer predicts on a fixed schedule with no distance to set, so ``teaCacheDistance`` would mean
nothing. The head hook is diffusers', with the step window and the consecutive limit added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from diffusers.hooks.first_block_cache import FBCBlockHook, FBCHeadBlockHook, FBCSharedBlockState
from diffusers.hooks.hooks import CacheContext, HookRegistry, ModelHook, StateManager

from imagewire.tasks.acceleration import CacheSettings
from imagewire.tasks.errors import InvalidParameter

HOOK_NAME = "imagewire_step_cache"
# The transformers' block lists, in the order they run (FLUX: double-stream, then single-stream).
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class StepClock:
    """The 0-based index of the step the denoiser is running, advanced by the pipeline's step-end callback."""

    def __init__(self) -> None:
        self.step = 0

    def after(self, callback: Callable[..., Any]) -> Callable[..., Any]:
        """``callback`` with the clock advanced before it runs (it may stop the call)."""

        def ticking(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            self.step += 1
            return callback(pipe, step, timestep, tensors)

        return ticking


@contextmanager
def caching(pipe: Any, settings: CacheSettings | None) -> Iterator[StepClock]:
    """The cache of ``settings`` on ``pipe``'s denoiser for the calls made inside; hands back the clock the step
    callback must advance (``clock.after``). Without settings, nothing is put on the pipeline."""
    clock = StepClock()
    if settings is None:
        yield clock
        return
    denoiser = getattr(pipe, "unet", None) if settings.kind == "deepCache" else getattr(pipe, "transformer", None)
    if denoiser is None:
        raise InvalidParameter(f"acceleratorOptions.{settings.kind} does not fit this model's pipeline",
                               parameter=f"acceleratorOptions.{settings.kind}")
    hooked = _deep_cache(denoiser, settings, clock) if settings.kind == "deepCache" else \
        _first_block_cache(denoiser, settings, clock)
    try:
        yield clock
    finally:
        for module in hooked:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME, recurse=False)
        HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()


def hooked_modules(denoiser: torch.nn.Module) -> list[str]:
    """The names of ``denoiser``'s modules that carry a step-cache hook now (none between calls)."""
    return [name for name, module in denoiser.named_modules()
            if HOOK_NAME in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})]


# ---------------------------------------------------------------- DeepCache


class _DeepCacheState:
    """Whether the current UNet call reuses the deep features, decided once per call."""

    def __init__(self, settings: CacheSettings, clock: StepClock) -> None:
        self.settings = settings
        self.clock = clock
        self.reusing = False
        self.in_a_row = 0       # steps reused since the last full one
        self.shape: tuple[int, ...] | None = None  # of the sample the kept features were made for

    def decide(self, sample: torch.Tensor) -> None:
        s, step = self.settings, self.clock.step
        # A full step every ``interval`` steps, and never more than ``max_consecutive`` reused in a row.
        self.reusing = (self.shape == tuple(sample.shape) and s.start <= step < s.end
                        and self.in_a_row < min(s.interval - 1, s.max_consecutive))
        self.in_a_row = self.in_a_row + 1 if self.reusing else 0
        self.shape = tuple(sample.shape)


class _DecideHook(ModelHook):
    """On the UNet: decides, before its blocks run, whether this call reuses."""

    def __init__(self, state: _DeepCacheState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict[str, Any]]:
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        self.state.decide(sample)
        return args, kwargs


class _ReplayHook(ModelHook):
    """On a deep block: runs it on full steps, keeping its output; on reused steps hands that output back."""

    def __init__(self, state: _DeepCacheState) -> None:
        super().__init__()
        self.state = state
        self.kept: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.state.reusing and self.kept is not None:
            return self.kept
        self.kept = cast(Any, self.fn_ref).original_forward(*args, **kwargs)
        return self.kept


def skip_branches(unet: Any) -> tuple[list[list[torch.nn.Module]], list[list[torch.nn.Module]]]:
    """The UNet's skip branches, shallowest first: for each, the down-path layers that make its skip connection
    (none for branch 0, whose skip is ``conv_in``'s output) and the up-path layers that run from where it joins
    back to the output (the layer taking it, and the upsampler after it where one closes the block)."""
    down: list[list[torch.nn.Module]] = [[]]
    for block in unet.down_blocks:
        down += _layers(block) + [[sampler] for sampler in (block.downsamplers or [])]
    up: list[list[torch.nn.Module]] = []
    for block in unet.up_blocks:
        layers = _layers(block)
        layers[-1] += list(block.upsamplers or [])
        up += layers
    up.reverse()  # the up path takes the skips back deepest first: its last layer takes branch 0
    assert len(down) == len(up), "a UNet's up path takes back every skip connection its down path makes"
    return down, up


def _layers(block: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """A UNet block's layers: each resnet with the attention after it, where the block has attentions."""
    resnets: Any = block.resnets
    attentions = getattr(block, "attentions", None) or [None] * len(resnets)
    return [[layer for layer in pair if layer is not None] for pair in zip(resnets, attentions, strict=True)]


def _deep_cache(unet: Any, settings: CacheSettings, clock: StepClock) -> list[torch.nn.Module]:
    down, up = skip_branches(unet)
    if settings.branch > len(down) - 1:
        raise InvalidParameter(
            f"acceleratorOptions.deepCacheBranchId must be 0 to {len(down) - 1} for this model (its UNet has "
            f"{len(down)} skip branches; 0 caches the most); received {settings.branch}.",
            parameter="acceleratorOptions.deepCacheBranchId", type="integer")
    state = _DeepCacheState(settings, clock)
    # Everything deeper than the branch: the layers making the deeper skips, the mid block, and the up layers
    # taking them back. The last of those hands the shallow part the cached deep feature.
    deep = [layer for layers in down[settings.branch + 1:] + up[settings.branch + 1:] for layer in layers]
    deep += [unet.mid_block] if unet.mid_block is not None else []
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(_DecideHook(state), HOOK_NAME)
    for layer in deep:
        HookRegistry.check_if_exists_or_initialize(layer).register_hook(_ReplayHook(state), HOOK_NAME)
    return [unet, *deep]


# ---------------------------------------------------------------- First Block Cache


class _WindowedHeadHook(FBCHeadBlockHook):
    """diffusers' head block hook, reusing only inside the step window and for a limited run of steps."""

    def __init__(self, state_manager: StateManager, settings: CacheSettings, clock: StepClock) -> None:
        super().__init__(state_manager, settings.threshold)
        self.settings = settings
        self.clock = clock

    def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
        s, step = self.settings, self.clock.step
        shared = self.state_manager.get_state()
        in_a_row = getattr(shared, "in_a_row", 0)
        compute = (not s.start <= step < s.end or in_a_row >= s.max_consecutive
                   or super()._should_compute_remaining_blocks(hidden_states_residual))
        shared.in_a_row = 0 if compute else in_a_row + 1
        return bool(compute)


class _TailHook(FBCBlockHook):
    """diffusers' tail block hook, also for a last block that gives no text stream back (SD 3's last block is
    ``context_pre_only``: its text output is None, which diffusers' hook would subtract from)."""

    def __init__(self, state_manager: StateManager) -> None:
        super().__init__(state_manager, is_tail=True)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        shared = self.state_manager.get_state()
        if not shared.should_compute:
            return super().new_forward(module, *args, **kwargs)
        output = cast(Any, self.fn_ref).original_forward(*args, **kwargs)
        meta: Any = self._metadata
        head = shared.head_block_output
        if not isinstance(output, tuple):
            shared.tail_block_residuals = (output - head, None)
            return output
        text = output[meta.return_encoder_hidden_states_index]
        # No text output: a zero residual, so a reused step hands the head block's text on. Nothing reads it
        # after the last block, but the reused step's output keeps its shape.
        shared.tail_block_residuals = (output[meta.return_hidden_states_index] - head[0],
                                       torch.zeros_like(head[1]) if text is None else text - head[1])
        return output


def _first_block_cache(transformer: Any, settings: CacheSettings, clock: StepClock) -> list[torch.nn.Module]:
    blocks = [block for name in _BLOCK_LISTS for block in getattr(transformer, name, ())]
    if len(blocks) < 2:
        raise InvalidParameter("acceleratorOptions.teaCache needs a transformer of two blocks at least",
                               parameter="acceleratorOptions.teaCache")
    state_manager = StateManager(cast(Any, FBCSharedBlockState), (), {})  # diffusers' hint says an instance
    # FluxPipeline names a context per denoiser call ("cond", "uncond"); the other pipelines name none, and
    # this one stands for them (a pipeline's own context replaces it while it is set).
    state_manager.set_context(CacheContext("call"))
    head, *middle, tail = blocks
    HookRegistry.check_if_exists_or_initialize(head).register_hook(
        _WindowedHeadHook(state_manager, settings, clock), HOOK_NAME)
    for block in middle:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(FBCBlockHook(state_manager), HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(tail).register_hook(_TailHook(state_manager), HOOK_NAME)
    # The transformer's registry lists its children's hooks once: it must see these.
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    return blocks
