"""taskType → handler. Each handler is an async generator of result items for one task."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from server.services import TaskContext
from tasks import get_response, image_inference, image_upload, model_search, schema

Handler = Callable[[Any, TaskContext], AsyncIterator[schema.Item | dict[str, Any]]]

HANDLERS: dict[type[schema.Task], Handler] = {
    schema.ImageInference: image_inference.run,
    schema.ImageUpload: image_upload.run,
    schema.ModelSearch: model_search.run,
    schema.GetResponse: get_response.run,
}


def handler_for(task: schema.Task) -> Handler:
    return HANDLERS[type(task)]
