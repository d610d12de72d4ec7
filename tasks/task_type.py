"""What a task module declares so that the server can run it without knowing it.

Running a task has two steps, so that every check a client can fail is made once, before any work
is queued or acknowledged:

1. ``prepare(task, ctx)``: every check that needs no I/O (the model exists, each value fits it).
   It raises a TaskError or returns what ``run`` needs.
2. ``run(prepared, ctx)``: the work. An async generator of result items, each sent (or kept) as
   soon as it is yielded.

``delivery`` says how the results travel; ``recorded`` whether the task's UUID and results are
kept (for ``conflictTaskUUID`` and ``getResponse``); ``single_frame`` whether the answer goes out
in one frame rather than an item at a time.

A task type that clients spell in more than one way (``imageUpscale`` and ``upscale``) has one wire
struct per spelling, the others subclassing the first with their own tag, and one ``TaskType`` per
spelling (``spelled``). Answers echo the spelling the client sent (``name_of``).
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


def requested(task: schema.Task) -> Delivery:
    """What the task asked for; tasks that are not ``Deliverable`` answer at once."""
    if isinstance(task, schema.Deliverable):
        return Delivery(asynchronous=task.deliveryMethod == "async", webhook_url=task.webhookURL)
    return Delivery()


@dataclass(frozen=True)
class TaskType(Generic[T, P]):
    struct: type[T]   # the wire struct; its msgspec tag is the taskType clients send
    prepare: Callable[[T, TaskContext], P]
    run: Callable[[P, TaskContext], AsyncIterator[Item]]
    delivery: Callable[[T], Delivery] = requested
    recorded: bool = True
    single_frame: bool = False
    # Whether it takes one of the unfinished-task places of its connection and key. A task that acts on
    # other tasks (cancelTask) does not, or it would be refused when they fill every place.
    takes_place: bool = True

    @property
    def name(self) -> str:
        tag = self.struct.__struct_config__.tag
        assert isinstance(tag, str)
        return tag

    def spelled(self, struct: type[T]) -> TaskType[T, P]:
        """The same task type under another name: ``struct`` subclasses this one's with its own tag."""
        assert issubclass(struct, self.struct), f"{struct.__name__} must subclass {self.struct.__name__}"
        return replace(self, struct=struct)


def name_of(task: schema.Task) -> str:
    """The taskType a task was sent as: what its answers carry."""
    tag = type(task).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def unchanged(task: T, ctx: TaskContext) -> T:
    """``prepare`` of a task whose checks all need I/O: the task goes to ``run`` as it came."""
    return task
