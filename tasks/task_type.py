"""What a task module declares so that the server can run it without knowing it.

Running a task has two steps, so that every check a client can fail is made once, before any work
is queued or acknowledged:

1. ``prepare(task, ctx)``: every check that needs no I/O (the model exists, each value fits it).
   It raises a TaskError or returns what ``run`` needs.
2. ``run(prepared, ctx)``: the work. An async generator of result items, each sent (or kept) as
   soon as it is yielded.

``delivery`` says how the results travel; ``recorded`` whether the task's UUID and results are
kept (for ``conflictTaskUUID`` and ``getResponse``); ``single_frame`` whether the answer goes out
in one frame rather than an item at a time. ``aliases`` are other spellings of the same task type
(the official SDKs do not all spell every task type alike): each is decoded into the same struct,
and answered under the spelling the client sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from imagewire.tasks import schema
from imagewire.tasks.context import TaskContext

T = TypeVar("T", bound=schema.Task)
P = TypeVar("P")

Item = schema.Item | dict[str, Any]


@dataclass(frozen=True)
class Delivery:
    asynchronous: bool = False   # acknowledge at once; results go to getResponse and the webhook
    webhook_url: str | None = None


SYNC = Delivery()


def _sync(task: Any) -> Delivery:
    return SYNC


@dataclass(frozen=True)
class TaskType(Generic[T, P]):
    struct: type[T]   # the wire struct; its msgspec tag is the taskType clients send
    prepare: Callable[[T, TaskContext], P]
    run: Callable[[P, TaskContext], AsyncIterator[Item]]
    delivery: Callable[[T], Delivery] = _sync
    recorded: bool = True
    single_frame: bool = False
    aliases: tuple[str, ...] = ()
    spelling: str | None = None   # the alias this entry answers to; None: the struct's tag

    @property
    def tag(self) -> str:
        """The struct's own tag: the canonical spelling."""
        tag = self.struct.__struct_config__.tag
        assert isinstance(tag, str)
        return tag

    @property
    def name(self) -> str:
        """The spelling this entry answers to, as acknowledgements, errors and records carry it."""
        return self.spelling or self.tag

    def spellings(self) -> tuple[TaskType[T, P], ...]:
        """This task type under each of its names: the tag, then every alias."""
        return (self, *(replace(self, spelling=alias) for alias in self.aliases))


def unchanged(task: T, ctx: TaskContext) -> T:
    """``prepare`` of a task whose checks all need I/O: the task goes to ``run`` as it came."""
    return task
