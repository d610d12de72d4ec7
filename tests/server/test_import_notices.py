"""Optional packages' import-time notices become debug lines: out of a plain log, in a debug one."""
import logging

import pytest

from imagewire.server import logs


@pytest.fixture
def captured():
    """The records that reach the root logger's handlers, with the filters of logs.configure in place."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    root = logging.getLogger()
    handler, level = Keep(), root.level
    root.addHandler(handler)
    logs.configure(logging.INFO)
    yield seen
    root.removeHandler(handler)
    root.setLevel(level)


def test_a_kernel_library_notice_is_left_out_of_a_plain_log(captured):
    logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
    logging.getLogger("torchao").warning("a quantized layer fell back to float")
    assert [record.getMessage() for record in captured] == ["a quantized layer fell back to float"]
    assert captured[0].levelname == "WARNING"


def test_under_debug_the_notice_is_shown_as_a_debug_line(captured):
    logging.getLogger().setLevel(logging.DEBUG)
    logging.getLogger("torchao.kernel.intmm").warning("Warning: Detected no triton, on systems without Triton")
    assert [(record.levelname, record.name) for record in captured] == [("DEBUG", "torchao.kernel.intmm")]


def test_errors_from_the_same_loggers_are_never_hidden(captured):
    logging.getLogger("torchao").error("Failed to load the checkpoint")
    assert [record.levelname for record in captured] == ["ERROR"]
