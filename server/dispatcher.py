"""taskType → handler. Each handler is an async generator of result items for one task.

A task type may also have a precheck: what can be said about the task without I/O. It runs before an
async task is acknowledged, so a client learns of a bad model or size at once, as in sync mode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from server.services import Services, TaskContext
from tasks import get_response, image_inference, image_upload, model_search, schema

Handler = Callable[[Any, TaskContext], AsyncIterator[schema.Item | dict[str, Any]]]
Precheck = Callable[[Any, Services], None]

HANDLERS: dict[type[schema.Task], Handler] = {
    schema.ImageInference: image_inference.run,
    schema.ImageUpload: image_upload.run,
    schema.ModelSearch: model_search.run,
    schema.GetResponse: get_response.run,
}


PRECHECKS: dict[type[schema.Task], Precheck] = {
    schema.ImageInference: image_inference.check,
}


def handler_for(task: schema.Task) -> Handler:
    return HANDLERS[type(task)]


def precheck(task: schema.Task, services: Services) -> None:
    """Raise the TaskError the handler would raise before doing any work, if that is known now."""
    if type(task) in PRECHECKS:
        PRECHECKS[type(task)](task, services)
