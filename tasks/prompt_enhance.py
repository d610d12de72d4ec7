"""promptEnhance: a small language model writes ``promptVersions`` richer versions of a prompt, each at most
``promptMaxLength`` tokens of that model.

The public API has no seed here; this server takes an optional ``seed`` and, without one, derives it
from the prompt and the length, so the same request gives the same versions (version i is drawn with
seed + i, and a version equal to an earlier one is drawn again: clients keep distinct versions only).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from imagewire.air_registry import ModelEntry
from imagewire.tasks import inputs, schema, tools
from imagewire.tasks.context import TaskContext
from imagewire.tasks.jobs import GeneratedText, Job
from imagewire.tasks.outputs import cost
from imagewire.tasks.schema import PromptEnhance, TextResult
from imagewire.tasks.task_type import TaskType

TASK = "promptEnhance"
DEFAULT_MODEL = "default-prompt-enhancer"


@dataclass(kw_only=True)
class PromptJob(Job):
    """Runs alone (the default batch key): each version is drawn with its own seed, one sequence at a time,
    so a version never depends on what else was generated beside it."""

    model: ModelEntry
    weights: Path
    prompt: str
    max_tokens: int
    versions: int
    seed: int

    @property
    def images(self) -> int:
        return self.versions


@dataclass(frozen=True)
class Prepared:
    task: PromptEnhance
    model: ModelEntry
    seed: int


def request_seed(prompt: str, max_tokens: int) -> int:
    """A seed that depends on the request alone, for requests that bring none."""
    digest = hashlib.sha256(f"{prompt}\0{max_tokens}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (schema.MAX_SEED - 100)


def prepare(task: PromptEnhance, ctx: TaskContext) -> Prepared:
    model = tools.model(ctx, task.model, default=DEFAULT_MODEL, task=TASK)
    seed = task.seed if task.seed is not None else request_seed(task.prompt, task.promptMaxLength)
    return Prepared(task=task, model=model, seed=seed)


async def run(prepared: Prepared, ctx: TaskContext) -> AsyncIterator[TextResult]:
    task = prepared.task
    weights = await inputs.weights(ctx, prepared.model)
    job = PromptJob(task_uuid=task.taskUUID, owner=ctx.owner, model=prepared.model, weights=weights,
                    prompt=task.prompt, max_tokens=task.promptMaxLength, versions=task.promptVersions,
                    seed=prepared.seed)
    version: GeneratedText
    async for version in tools.results(ctx, job):
        yield TextResult(taskType=TASK, taskUUID=task.taskUUID, text=version.text,
                         cost=cost(ctx, version.seconds) if task.includeCost else None)


TASK_TYPE = TaskType(struct=PromptEnhance, prepare=prepare, run=run, delivery=tools.delivery)
