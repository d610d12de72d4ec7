"""The task types this server runs: one line each. A new task type is a module beside this one
(its ``TASK_TYPE``) and a line here; the transport learns of it from this table alone. A task type
with ``aliases`` is listed under every spelling, each mapping to the same struct and handler."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from imagewire.tasks import controlnet_preprocess, get_response, image_inference, image_upload, model_search
from imagewire.tasks.task_type import TaskType

SUPPORTED: Mapping[str, TaskType[Any, Any]] = MappingProxyType({
    spelled.name: spelled for task_type in (
        image_inference.TASK_TYPE,
        image_upload.TASK_TYPE,
        model_search.TASK_TYPE,
        get_response.TASK_TYPE,
        controlnet_preprocess.TASK_TYPE,
    ) for spelled in task_type.spellings()
})
