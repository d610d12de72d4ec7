"""What both transports do with a decoded task array, so a task gets the same answers whichever way it
came: over the WebSocket (``server/connection.py``) or in an HTTP POST (``server/rest.py``).

Pings and authentication are answered at once; before authentication every other task gets
missingApiKey; a task that failed to decode gets its error item; every other task goes to the runner.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from imagewire.server.protocol import Decoded
from imagewire.server.task_runner import TaskRunner
from imagewire.tasks import schema
from imagewire.tasks.errors import InvalidApiKey, MissingApiKey
from imagewire.tasks.supported import SUPPORTED
from imagewire.tasks.task_type import Item, TaskType

log = logging.getLogger("imagewire.task")

TRANSPORT_TASKS = ("authentication", "ping")


def missing_api_key() -> MissingApiKey:
    return MissingApiKey('Authenticate first: send [{"taskType":"authentication","apiKey":"..."}] before other '
                         "tasks, or an Authorization: Bearer header over HTTP.", parameter="apiKey", type="string")


def invalid_api_key() -> InvalidApiKey:
    return InvalidApiKey("Invalid API key: the server does not accept the apiKey given.",
                         parameter="apiKey", type="string")


class Dispatcher(ABC):
    runner: TaskRunner

    @property
    @abstractmethod
    def authenticated(self) -> bool: ...

    @abstractmethod
    async def answer(self, data: Sequence[Item] = (), errors: Sequence[dict[str, Any]] = ()) -> None:
        """Answer at once, on this socket or in this response (pongs, authentication)."""

    @abstractmethod
    async def reply(self, data: Sequence[Item] = (), errors: Sequence[dict[str, Any]] = ()) -> None:
        """Answer a task: where the transport keeps a task's answers (a session's outbox, a response)."""

    @abstractmethod
    async def authenticate(self, task: schema.Authentication) -> None: ...

    @abstractmethod
    async def start(self, task: schema.Task, task_type: TaskType[Any, Any], task_uuid: str) -> None: ...

    async def take(self, decoded: Sequence[Decoded]) -> None:
        for element in decoded:
            if not self.authenticated and element.task_type not in TRANSPORT_TASKS:
                # Before authentication every other task gets the same answer, valid or not.
                await self.answer(errors=[missing_api_key().to_item(element.task_type, element.task_uuid)])
            elif element.error is not None:
                log.info("taskUUID=%s taskType=%s outcome=%s", element.task_uuid, element.task_type,
                         element.error.code)
                self.runner.refused(element.task_type, element.error.code)
                await self.reply(errors=[element.error.to_item(element.task_type, element.task_uuid)])
            elif isinstance(element.task, schema.Ping):
                await self.answer(data=[schema.Pong(taskType="ping", pong=True)])
            elif isinstance(element.task, schema.Authentication):
                await self.authenticate(element.task)
            else:
                assert element.task is not None and element.task_type is not None and element.task_uuid
                await self.start(element.task, SUPPORTED[element.task_type], element.task_uuid)
