"""The task types this server runs: one line each. A new task type is a module beside this one
(its ``TASK_TYPE``) and a line here; the transport learns of it from this table alone."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from imagewire.tasks import (
    background_removal,
    cancel_task,
    controlnet_preprocess,
    get_response,
    image_caption,
    image_history,
    image_inference,
    image_masking,
    image_upload,
    image_upscale,
    model_download,
    model_search,
    model_upload,
    prompt_enhance,
    schema,
)
from imagewire.tasks.task_type import TaskType

SUPPORTED: Mapping[str, TaskType[Any, Any]] = MappingProxyType({
    task_type.name: task_type for task_type in (
        image_inference.TASK_TYPE,
        image_upload.TASK_TYPE,
        model_search.TASK_TYPE,
        get_response.TASK_TYPE,
        cancel_task.TASK_TYPE,
        image_history.TASK_TYPE,
        image_upscale.TASK_TYPE,
        image_upscale.TASK_TYPE.spelled(schema.Upscale),
        background_removal.TASK_TYPE,
        background_removal.TASK_TYPE.spelled(schema.RemoveBackground),
        image_caption.TASK_TYPE,
        image_caption.TASK_TYPE.spelled(schema.Caption),
        prompt_enhance.TASK_TYPE,
        controlnet_preprocess.TASK_TYPE,
        controlnet_preprocess.TASK_TYPE.spelled(schema.ControlNetPreprocess),
        model_upload.TASK_TYPE,
        model_download.TASK_TYPE,
        image_masking.TASK_TYPE,
    )
})
