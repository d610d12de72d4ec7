"""One error tree for everything a client can cause.

    TaskError                      code sent on the wire
    ├── InvalidParameter           invalidParameter (or a specific code such as invalidWidth)
    ├── MissingParameter           missingParameter
    ├── UnknownParameter           unknownParameter
    ├── UnsupportedParameter       unsupportedParameter
    ├── UnsupportedTaskType        unsupportedTaskType
    ├── InvalidApiKey              invalidApiKey
    ├── MissingApiKey              missingApiKey
    ├── ConflictTaskUUID           conflictTaskUUID
    ├── ModelNotFound              modelNotFound
    ├── ImageNotFound              imageNotFound
    ├── TaskNotFound               taskNotFound
    ├── ServiceUnavailable         serviceUnavailable (queue full, shutting down)
    │   └── TooManyTasks           serviceUnavailable (a connection's or a key's task limit)
    ├── TaskCancelled              taskCancelled (cancelTask stopped it)
    ├── InferenceError             inferenceError (the pipeline failed; other tasks go on)
    ├── StorageError               storageError (disk full and friends)
    ├── UploadFailed               uploadFailed (a result's PUT to uploadEndpoint; the result itself stands)
    └── InternalServerError        internalServerError (our own bug; the message never leaks details)

Foreign exceptions (PIL, OSError, torch, msgspec) are translated where they are caught,
with ``raise ... from exc``, so a traceback in the log still shows the cause while the
client sees only the sentence. The ground floors' own errors (``storage.errors``,
``air_registry.errors``) become these in one place, ``tasks/inputs.py``.
"""

from __future__ import annotations

from typing import Any


class ErrorItem(dict[str, Any]):
    """An error item as it goes on the wire (a plain JSON object), remembering the HTTP status that
    a REST answer made only of such errors gets."""

    http_status = 400


class TaskError(Exception):
    code = "internalServerError"
    # The HTTP status of a REST answer whose tasks all failed this way (server/rest.py).
    http_status = 400

    def __init__(
        self,
        message: str,
        *,
        parameter: str | None = None,
        type: str | None = None,
        allowed_values: list[Any] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.parameter = parameter
        self.type = type
        self.allowed_values = allowed_values
        if code is not None:
            self.code = code

    def to_item(self, task_type: str | None, task_uuid: str | None) -> ErrorItem:
        """The wire form of this error, scoped to one task."""
        message = self.message if len(self.message) <= MAX_MESSAGE else self.message[: MAX_MESSAGE - 3] + "..."
        item = ErrorItem(code=self.code, message=message)
        item.http_status = self.http_status
        if self.parameter is not None:
            item["parameter"] = short_name(self.parameter, 2 * MAX_NAME)
        if self.type is not None:
            item["type"] = self.type
        if self.allowed_values is not None:
            item["allowedValues"] = self.allowed_values
        if task_type is not None:
            item["taskType"] = task_type
        if task_uuid is not None:
            item["taskUUID"] = task_uuid
        return item


class InvalidParameter(TaskError):
    code = "invalidParameter"


class MissingParameter(TaskError):
    code = "missingParameter"


class UnknownParameter(TaskError):
    code = "unknownParameter"


class UnsupportedParameter(TaskError):
    code = "unsupportedParameter"


class UnsupportedTaskType(TaskError):
    code = "unsupportedTaskType"


class InvalidApiKey(TaskError):
    code = "invalidApiKey"
    http_status = 401


class MissingApiKey(TaskError):
    code = "missingApiKey"
    http_status = 401


class ConflictTaskUUID(TaskError):
    code = "conflictTaskUUID"
    http_status = 409


class ModelNotFound(TaskError):
    code = "modelNotFound"
    http_status = 404


class ImageNotFound(TaskError):
    code = "imageNotFound"
    http_status = 404


class TaskNotFound(TaskError):
    code = "taskNotFound"
    http_status = 404


class ServiceUnavailable(TaskError):
    code = "serviceUnavailable"
    http_status = 503


class TooManyTasks(ServiceUnavailable):
    """A connection's or an API key's bound on unfinished tasks: the client should slow down."""

    http_status = 429


class TaskCancelled(TaskError):
    code = "taskCancelled"
    http_status = 409


class InferenceError(TaskError):
    code = "inferenceError"
    http_status = 500


class StorageError(TaskError):
    code = "storageError"
    http_status = 507


class UploadFailed(TaskError):
    """A result image was stored, and is answered, but the PUT to the task's uploadEndpoint failed."""

    code = "uploadFailed"
    http_status = 502


class ResponseTooLarge(TaskError):
    """A REST answer would pass its bound (``--max-outbox-mib``): this result is left out of it."""

    code = "responseTooLarge"
    http_status = 413


class InternalServerError(TaskError):
    code = "internalServerError"
    http_status = 500


# An error item repeats at most this much of what a client sent (a name, a value) and of its own message:
# an answer must never be a way to make the server hold or send back a client's megabytes.
MAX_NAME = 100
MAX_MESSAGE = 2000


def short_name(name: str, limit: int = MAX_NAME) -> str:
    """A client-chosen name (a parameter, a key) as an error item may repeat it."""
    return name if len(name) <= limit else name[: limit - 3] + "..."


def describe_value(value: Any, limit: int = 60) -> str:
    """A short, safe rendering of a client value for an error message."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
