"""A real ``python -m server`` child process: started on a free port, its log parsed, its memory read."""

from __future__ import annotations

import collections
import ctypes
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1

_LISTENING = re.compile(r"imagewire listening on (ws://\S+)")
_TASK_LINE = re.compile(
    r"imagewire\.task taskUUID=(?P<uuid>\S+) taskType=(?P<type>\S+) outcome=(?P<outcome>\S+)"
    r"(?: results=(?P<results>\d+) total_ms=(?P<total>[\d.]+)(?P<stages>.*))?")
_STAGE = re.compile(r"(\w+)_ms=([\d.]+)")
# The scheduler's line for a pipeline call shared by several tasks.
_SHARED_CALL = re.compile(r"\d+ tasks \((?P<images>\d+) images\) share a pipeline call: (?P<tasks>.*)")
_TASK_UUID = re.compile(r"taskUUID=(\S+)")


@dataclass(frozen=True)
class TaskLog:
    """One ``imagewire.task`` line: where the server says a task's time went."""

    task_uuid: str
    task_type: str
    outcome: str
    total_ms: float | None
    stages_ms: dict[str, float]


def parse_task_line(line: str) -> TaskLog | None:
    match = _TASK_LINE.search(line)
    if match is None:
        return None
    total = match["total"]
    stages = {name: float(value) for name, value in _STAGE.findall(match["stages"] or "")}
    return TaskLog(match["uuid"], match["type"], match["outcome"], float(total) if total else None, stages)


def read_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of ``pid``, in KiB, from /proc."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(rest.split()[0])
    return fields


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM if the harness dies, so no server is left behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: stop() still ends the server on every normal exit


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """Owns one server child. Its stderr is read by a thread, so the log never blocks the server."""

    def __init__(self, *, data_dir: Path, api_key: str, device: str, catalogs: tuple[Path, ...] = (),
                 extra_args: tuple[str, ...] = (), open_files: int | None = None,
                 env: dict[str, str] | None = None, checkout: Path | None = None) -> None:
        # ``checkout``: another checkout of this project with its own .venv, to run the same scenario against
        # its server (an older commit, for a before-and-after figure); by default this one.
        self.checkout = checkout or REPO_ROOT
        python = str(self.checkout / ".venv" / "bin" / "python") if checkout is not None else sys.executable
        self.command = [python, "-m", "imagewire.server", "--host", "127.0.0.1", "--port", "0",
                        "--data-dir", str(data_dir), f"--api-key={api_key}", "--device", device,
                        "--log-level", "INFO", *extra_args]
        for catalog in catalogs:
            self.command += ["--catalog", str(catalog)]
        self.env = dict(env or {})  # on top of this process's environment
        self.open_files = open_files  # the child's hard and soft limit of open files; None: inherited
        self.url = ""
        self.log_lines = 0
        self.log_bytes = 0
        self.task_logs: dict[str, TaskLog] = {}
        self.call_images: dict[str, int] = {}  # taskUUID → images in its pipeline call, for shared calls
        self.on_line: list[Callable[[str], None]] = []  # called with each log line, as it is read
        self._tail: collections.deque[str] = collections.deque(maxlen=60)
        self._listening = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise ServerError("the server is not running")
        return self._process.pid

    def start(self, timeout: float = 180.0) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               **self.env}
        self._process = subprocess.Popen(self.command, cwd=self.checkout, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1,
                                         preexec_fn=self._in_child)
        self._reader = threading.Thread(target=self._read_log, name="bench-server-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerError("the server did not start:\n" + self.log_tail())
        return self.url

    def _in_child(self) -> None:
        _die_with_parent()
        if self.open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def _read_log(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            self.log_lines += 1
            self.log_bytes += len(line.encode())
            self._tail.append(line.rstrip())
            for hook in self.on_line:
                hook(line)
            if not self._listening.is_set():
                found = _LISTENING.search(line)
                if found:
                    self.url = found.group(1)
                    self._listening.set()
            parsed = parse_task_line(line)
            if parsed is not None:
                with self._lock:
                    self.task_logs[parsed.task_uuid] = parsed
            shared = _SHARED_CALL.search(line)
            if shared is not None:
                with self._lock:
                    for task_uuid in _TASK_UUID.findall(shared["tasks"]):
                        self.call_images[task_uuid] = int(shared["images"])

    def log_tail(self) -> str:
        return "\n".join(self._tail)

    def wait_for_logs(self, task_uuids: list[str], timeout: float = 10.0) -> list[TaskLog]:
        """The log entries of ``task_uuids``; a task's line comes just after its result, so wait a moment."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [self.task_logs[uuid] for uuid in task_uuids if uuid in self.task_logs]
            if len(found) == len(task_uuids) or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def images_per_call(self, log: TaskLog) -> int:
        """Images made by the pipeline call that made ``log``'s task: shared calls are logged as such."""
        with self._lock:
            return self.call_images.get(log.task_uuid, 1)

    def memory_kib(self) -> dict[str, int]:
        return read_memory_kib(self.pid)

    def stop(self, timeout: float = 60.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(5)
        if process.stderr is not None:
            process.stderr.close()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
