"""``acceleration`` and ``acceleratorOptions``: step caching, checked against the model and the steps.

Two kinds of cache, each for the model families it was made for:

- DeepCache (``deepCache``) for the UNet families (SD 1.x/2.x, SDXL): on a full step the whole UNet runs and
  the output of its deep levels is kept; on the next steps only the shallowest levels run (down to the level
  ``deepCacheBranchId`` counts, from the shallowest) and take the kept deep features with fresh skip
  connections. A full step comes back every ``deepCacheInterval`` steps.
- First Block Cache (``teaCache``) for the transformer families (FLUX, SD 3): every step runs the first
  transformer block; when its residual has changed by less than a threshold since the last full step, the
  other blocks are skipped and their residual from that step is added instead. ``teaCacheDistance`` (0 to 1)
  sets the threshold: higher reuses more.

Both reuse only inside the step window (``cacheStartStep``/``cacheEndStep`` or their percentages; steps count
from the first denoising step the call runs, 0-based, the end excluded) and never more than
``cacheMaxConsecutiveSteps`` steps in a row. ``acceleration`` picks a preset of these options per family
(``PRESETS``); any option sent overrides the preset's. The result is a ``CacheSettings``, part of the job's
batch key: tasks with different settings never share a pipeline call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagewire.air_registry import ARCHITECTURES, ModelEntry
from imagewire.tasks.errors import InvalidParameter, UnsupportedParameter
from imagewire.tasks.schema import AcceleratorOptions, ImageInference

UNET_FAMILIES = frozenset({"sd", "sdxl"})
TRANSFORMER_FAMILIES = frozenset({"flux", "sd3", "flux-kontext"})
_FITS = {"deepCache": ("UNet models (SD 1.x, SD 2.x, SDXL)", UNET_FAMILIES),
         "teaCache": ("transformer models (FLUX, SD 3)", TRANSFORMER_FAMILIES)}
# The options that tune one cache, and the cache they tune.
_TUNES = {"teaCacheDistance": "teaCache", "deepCacheInterval": "deepCache", "deepCacheBranchId": "deepCache"}
_WINDOW = ("cacheStartStep", "cacheStartStepPercentage", "cacheEndStep", "cacheEndStepPercentage",
           "cacheMaxConsecutiveSteps")

# The documented defaults of the options a request or preset leaves out.
DEFAULTS: dict[str, Any] = {"teaCacheDistance": 0.5, "deepCacheInterval": 3, "deepCacheBranchId": 0,
                            "cacheMaxConsecutiveSteps": 3}

# teaCacheDistance d sets First Block Cache's threshold (the relative change of the first block's residual below
# which a step is reused) to MAX_THRESHOLD × d²: the default 0.5 lands on 0.125, where published FLUX.1 settings
# sit (0.08 to 0.12 for about 1.5-2× at little loss), 0.3 on 0.045 (rarely reuses), and 1 on 0.5, past where
# a trained model's steps ever differ by less in the middle of a run (random-weight ones differ by 0.2 to 0.5).
MAX_THRESHOLD = 0.5

# What each preset sets, per kind of model (docs/protocol.md has the table with measured figures). The presets
# leave ``steps`` alone: at a fixed seed fewer steps move the image far more than the caches do (bench/
# acceleration.py), so cutting them is left to the client. Both caches keep the last steps full, where
# the fine detail forms.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "none": {"unet": {}, "transformer": {}},
    "low": {
        "unet": {"deepCache": True, "deepCacheInterval": 2, "deepCacheBranchId": 0,
                 "cacheEndStepPercentage": 90},
        "transformer": {"teaCache": True, "teaCacheDistance": 0.3, "cacheMaxConsecutiveSteps": 1,
                        "cacheEndStepPercentage": 90},
    },
    "medium": {
        "unet": {"deepCache": True, "deepCacheInterval": 3, "deepCacheBranchId": 0,
                 "cacheEndStepPercentage": 90},
        "transformer": {"teaCache": True, "teaCacheDistance": 0.5, "cacheMaxConsecutiveSteps": 2,
                        "cacheEndStepPercentage": 90},
    },
    "high": {
        "unet": {"deepCache": True, "deepCacheInterval": 4, "deepCacheBranchId": 0},
        "transformer": {"teaCache": True, "teaCacheDistance": 0.8, "cacheMaxConsecutiveSteps": 3},
    },
}


@dataclass(frozen=True)
class CacheSettings:
    """One cache, resolved: what the engine applies around a pipeline call (``server/engine/acceleration.py``)."""

    kind: str                 # "deepCache" or "teaCache"
    start: int                # the first step that may reuse (0-based, of the steps the call runs)
    end: int                  # steps from here on run in full
    max_consecutive: int      # reused steps in a row, at most
    interval: int = 1         # deepCache: a full step every ``interval`` steps
    branch: int = 0           # deepCache: the deepest level that still runs on reused steps
    threshold: float = 0.0    # teaCache: First Block Cache's relative change below which a step is reused


def kind_of(model: ModelEntry) -> str | None:
    family = ARCHITECTURES[model.architecture].family
    return "unet" if family in UNET_FAMILIES else "transformer" if family in TRANSFORMER_FAMILIES else None


def prepare(task: ImageInference, model: ModelEntry, steps: int) -> CacheSettings | None:
    """The cache the task asks for, directly or through its preset, checked against ``model`` and ``steps``;
    None for none. Raises a TaskError naming the option (``acceleratorOptions.cacheEndStep``)."""
    sent = _sent(task.acceleratorOptions)
    family = ARCHITECTURES[model.architecture].family
    for cache, (fits, families) in _FITS.items():
        tuning = [name for name, tuned in _TUNES.items() if tuned == cache and name in sent]
        named = [cache] if sent.get(cache) else tuning
        if named and family not in families:
            raise UnsupportedParameter(
                f"acceleratorOptions.{named[0]} applies to {fits} only; model {model.air} is a {family} model. "
                f"Use acceleratorOptions.{'teaCache' if cache == 'deepCache' else 'deepCache'} or an "
                f"acceleration preset, which picks the cache that fits.",
                parameter=f"acceleratorOptions.{named[0]}")
    kind = kind_of(model)
    preset = PRESETS[task.acceleration or "none"].get(kind or "", {})
    options = {**DEFAULTS, **preset, **sent}
    chosen = next((name for name in _FITS if options.get(name)), None)
    if chosen is None:
        # Nothing is cached: a tuning or window option would be read by nobody.
        stray = next((name for name in (*_TUNES, *_WINDOW) if name in sent), None)
        if stray is not None:
            raise InvalidParameter(
                f"acceleratorOptions.{stray} tunes a step cache, and none is on for this task: send "
                f"acceleratorOptions.{'deepCache' if kind == 'unet' else 'teaCache'}: true or an acceleration preset "
                f"with it, or leave it out.", parameter=f"acceleratorOptions.{stray}")
        return None
    start, end = _window(options, sent, steps)
    max_consecutive = options["cacheMaxConsecutiveSteps"]
    if chosen == "deepCache":
        return CacheSettings(kind=chosen, start=start, end=end, max_consecutive=max_consecutive,
                             interval=options["deepCacheInterval"], branch=options["deepCacheBranchId"])
    return CacheSettings(kind=chosen, start=start, end=end, max_consecutive=max_consecutive,
                         threshold=round(MAX_THRESHOLD * options["teaCacheDistance"] ** 2, 6))


def _sent(options: AcceleratorOptions | None) -> dict[str, Any]:
    if options is None:
        return {}
    return {name: getattr(options, name) for name in options.__struct_fields__ if getattr(options, name) is not None}


def _window(options: dict[str, Any], sent: dict[str, Any], steps: int) -> tuple[int, int]:
    """The step window ``[start, end)``: steps, or percentages of ``steps``, one of each pair at most (a value the
    request sent wins over its preset's alternative)."""
    bounds = []
    for name, default in (("cacheStartStep", 0), ("cacheEndStep", steps)):
        percentage = name + "Percentage"
        if name in sent and percentage in sent:
            raise InvalidParameter(f"acceleratorOptions.{name} and acceleratorOptions.{percentage} are alternatives: "
                                   "send one of them.", parameter=f"acceleratorOptions.{name}")
        if name in sent or (name in options and percentage not in sent):
            bounds.append((name, options[name]))
        elif percentage in options:
            share = options[percentage] * steps
            # The start rounds down and the end up, so that a window never comes out empty by rounding alone.
            bounds.append((percentage, share // 100 if name == "cacheStartStep" else -(-share // 100)))
        else:
            bounds.append((name, default))
    (start_name, start), (end_name, end) = bounds
    if not 0 <= start < steps:
        raise InvalidParameter(
            f"acceleratorOptions.{start_name} must leave at least one step to cache: 0 to {steps - 1} steps for "
            f"this task's {steps} steps; received {sent.get(start_name, start)}.",
            parameter=f"acceleratorOptions.{start_name}", type="integer")
    if not start < end <= steps:
        received = sent.get(end_name, end)
        allowed = (f"{start + 1} to {steps}" if end_name == "cacheEndStep"
                   else f"{-(-(start + 1) * 100 // steps)} to 100 (percent of {steps} steps)")
        raise InvalidParameter(
            f"acceleratorOptions.{end_name} must be after the cache's start (step {start}) and at most the task's "
            f"steps: {allowed}; received {received}.", parameter=f"acceleratorOptions.{end_name}", type="integer")
    return start, end
