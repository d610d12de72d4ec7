"""The one exception the client raises for anything the server (or the link to it) refuses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Codes the client itself uses when no server answer exists to carry one.
TIMEOUT = "timeout"
CONNECTION_FAILED = "connectionFailed"
CONNECTION_LOST = "connectionLost"
CLIENT_CLOSED = "clientClosed"
INVALID_IMAGE = "invalidImage"
INVALID_RESPONSE = "invalidResponse"


class ImagewireError(Exception):
    """An error item from the server, or a client-side failure shaped like one.

    Attributes mirror the wire's error item: ``code`` (camelCase identifier such as
    ``invalidWidth``), ``message`` (a human sentence), ``parameter`` (the request field at
    fault, if any), ``task_uuid`` (the task it answers), ``task_type`` and
    ``allowed_values`` (when the server lists them).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        parameter: str | None = None,
        task_uuid: str | None = None,
        task_type: str | None = None,
        allowed_values: list[Any] | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.parameter = parameter
        self.task_uuid = task_uuid
        self.task_type = task_type
        self.allowed_values = allowed_values

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> ImagewireError:
        """Build the exception from one item of a frame's ``errors`` array."""
        allowed = item.get("allowedValues")
        return cls(
            str(item.get("code") or "unknownError"),
            str(item.get("message") or item.get("error") or "The server reported an error without a message."),
            parameter=item.get("parameter"),
            task_uuid=item.get("taskUUID"),
            task_type=item.get("taskType"),
            allowed_values=list(allowed) if isinstance(allowed, list) else None,
        )

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        if self.parameter:
            text += f" (parameter: {self.parameter})"
        return text

    def __repr__(self) -> str:
        return f"ImagewireError(code={self.code!r}, message={self.message!r}, parameter={self.parameter!r})"
