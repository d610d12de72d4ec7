"""Log lines are written by a thread of their own: a blocked output never holds the code that logs."""

from __future__ import annotations

import logging
import threading

from imagewire.server.logs import QueuedWriter


class Blocked(logging.Handler):
    """An output that takes nothing until it is let go (a terminal scrolled back, a full pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.go.wait()
        self.lines.append(record.getMessage())


def logger_writing_to(writer: QueuedWriter) -> logging.Logger:
    logger = logging.getLogger(f"imagewire.test-writer-{id(writer)}")
    logger.propagate = False
    logger.addHandler(writer)
    logger.setLevel(logging.INFO)
    return logger


def test_logging_returns_while_the_output_is_blocked_and_every_line_is_written_after():
    output = Blocked()
    writer = QueuedWriter(output)
    logger = logger_writing_to(writer)
    for index in range(3):
        logger.info("task %d", index)  # with the output in this thread, the first call would never return
    output.go.set()
    writer.close()  # as logging.shutdown does at exit: what waits is written first
    assert output.lines == ["task 0", "task 1", "task 2"]


def test_past_the_queue_lines_are_dropped_and_the_next_line_in_says_how_many():
    output = Blocked()
    writer = QueuedWriter(output, size=2)
    logger = logger_writing_to(writer)
    for index in range(10):
        logger.info("task %d", index)
    assert writer.dropped >= 7  # the writer holds one, the queue two
    output.go.set()
    writer.queue.join()  # written out
    logger.info("after")
    writer.close()
    assert output.lines[-2:] == [writer_dropped_line(output), "after"]
    assert len(output.lines) <= 5


def writer_dropped_line(output: Blocked) -> str:
    [line] = [line for line in output.lines if "log lines were dropped" in line]
    count = int(line.split()[0])
    assert 7 <= count <= 8
    return line
