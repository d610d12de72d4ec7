"""The process's log: one line per record, greppable by taskUUID, and readable under abuse. What a client
can cause again and again (a malformed HTTP request, a flood of connections that runs out of file
descriptors) is one line per interval with a count, not a traceback per attempt; the server's own bugs keep
their tracebacks.

A record's message is one line whatever a client sent: every record made in the process has the control
characters of its message (newlines, carriage returns, escape sequences, Unicode line separators) written as
escapes (``\\n``, ``\\x1b``), at the one place records are made (``escape_messages``). A taskUUID holding a
newline cannot forge an ``outcome=success`` line below its own, and a terminal reading the log runs no
escape sequence a client chose. Tracebacks are not messages: they keep their lines.

Lines are written by a thread of their own (``QueuedWriter``): writing to stderr blocks while what reads it (a
terminal, a pipe to journald or docker) is slow, and the server logs a line per task from its event loop,
where a blocked write would stop every socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import logging.handlers
import queue
import re
import time
import weakref
from typing import Any

from aiohttp import http_exceptions

INTERVAL_SECONDS = 10.0
FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Records waiting for the writer; past them (its output is blocked that long), records are dropped and counted.
QUEUED_RECORDS = 10_000
log = logging.getLogger("imagewire.server")

# An accept() that fails for want of descriptors or memory: the listening loop retries on its own.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators: whatever could end a line or
# steer a terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escaped(text: str) -> str:
    """``text`` with each control character written as its escape: one line, printable."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def escape_messages() -> None:
    """Make every log record's message one printable line, once per process.

    The record factory is where every record of every logger is made, after its level was found enabled, so
    no message can reach a handler (ours, a test's, a library's) unescaped, however it was formatted."""
    make = logging.getLogRecordFactory()
    if getattr(make, "escapes_messages", False):
        return

    def make_escaped(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:
            return record  # a bad format: logging's own error handling reports it where the record is emitted
        if _CONTROL.search(message):
            record.msg, record.args = escaped(message), ()
        return record

    make_escaped.escapes_messages = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_escaped)


class Repeats:
    """Counts a kind of event; says whether now is the time to log it, and how many went unsaid."""

    def __init__(self, interval: float = INTERVAL_SECONDS) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._unsaid: dict[str, int] = {}

    def due(self, kind: str) -> tuple[bool, int]:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) < self.interval:
            self._unsaid[kind] = self._unsaid.get(kind, 0) + 1
            return False, 0
        self._last[kind] = now
        return True, self._unsaid.pop(kind, 0)


class ClientMistakes(logging.Filter):
    """For aiohttp's "Error handling request" lines about requests that are not valid HTTP: no
    traceback, one line per interval."""

    def __init__(self) -> None:
        super().__init__()
        self.repeats = Repeats()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, http_exceptions.HttpProcessingError):
            return True
        due, unsaid = self.repeats.due("malformed-http")
        if not due:
            return False
        record.exc_info, record.exc_text = None, None
        record.msg = f"{record.msg}: {type(error).__name__}: {escaped(str(error.message))}" + (
            f" ({unsaid} more since the last such line)" if unsaid else "")
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


# Notices that optional packages log while being imported, which ask an operator for nothing they could do:
# transformers names each image processor that falls back to its PIL version for want of torchvision (the
# server's image processors are the PIL ones, and loading the first model imports every diffusers pipeline);
# where the quantize extra is installed, torchao names each CUDA kernel library its build could not load on
# this machine and that Triton is missing, torch's tree utilities flag two of torchao's enums, and diffusers
# says that some torchao tensor types moved. Keyed by the logger that logs them.
IMPORT_NOTICES: dict[str, tuple[str, ...]] = {
    "transformers.utils.import_utils": ("requires torchvision",),
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}


class ImportNotices(logging.Filter):
    """Turns one logger's import-time notices (IMPORT_NOTICES) into debug lines: shown under --log-level debug,
    left out otherwise. Their loggers' own levels let them through before any filter runs, so the level of the
    root logger decides here."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING or not any(part in record.getMessage() for part in self.fragments):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class _Listener(logging.handlers.QueueListener):
    def __init__(self, records: queue.Queue[Any], *handlers: logging.Handler, respect_handler_level: bool) -> None:
        super().__init__(records, *handlers, respect_handler_level=respect_handler_level)
        self.records = records

    def enqueue_sentinel(self) -> None:
        # Waits for room: a full queue (an output blocked a while) must still be written out at exit. None is
        # the listener's own sentinel.
        self.records.put(None, timeout=30)


class QueuedWriter(logging.handlers.QueueHandler):
    """Hands records to ``handler`` through a bounded queue and a thread of its own, so that logging never
    waits on the handler's output. Records that find the queue full are dropped, and the next one that gets in
    is preceded by a line saying how many."""

    def __init__(self, handler: logging.Handler, size: int = QUEUED_RECORDS) -> None:
        records: queue.Queue[Any] = queue.Queue(size)
        super().__init__(records)
        self.dropped = 0
        self.listener = _Listener(records, handler, respect_handler_level=True)
        self.listener.start()

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                note = logging.LogRecord("imagewire.logs", logging.WARNING, __file__, 0,
                                         "%d log lines were dropped: the log's output was not taking them",
                                         (self.dropped,), None)
                self.queue.put_nowait(self.prepare(note))
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        """At exit (``logging.shutdown``): what waits is written first."""
        with contextlib.suppress(Exception):
            self.listener.stop()
        super().close()


def configure(level: int | str) -> None:
    """Logging for a server or replica process, before anything loads a model: lines written by their own
    thread to stderr (unless the process's logging is set up already)."""
    escape_messages()
    root = logging.getLogger()
    if not root.handlers:
        output = logging.StreamHandler()
        output.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(QueuedWriter(output))
        root.setLevel(level)
    for name, fragments in IMPORT_NOTICES.items():
        notices = logging.getLogger(name)
        if not any(isinstance(existing, ImportNotices) for existing in notices.filters):
            notices.addFilter(ImportNotices(fragments))


_FILTER = ClientMistakes()
_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Once per process for aiohttp's log and for escaping, once per event loop for its exception handler."""
    escape_messages()
    server_log = logging.getLogger("aiohttp.server")
    if _FILTER not in server_log.filters:
        server_log.addFilter(_FILTER)
    if loop in _LOOPS:
        return
    _LOOPS.add(loop)
    repeats = Repeats()
    default = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in _RESOURCE_ERRORS:
            due, unsaid = repeats.due("accept")
            if due:
                log.warning("accepting connections failed: %s%s; the server goes on", error.strerror,
                            f" ({unsaid} more since the last such line)" if unsaid else "")
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
