from __future__ import annotations

from typing import Any

import pytest

from imagewire.air_registry.air import AIR, parse_air
from imagewire.air_registry.errors import MalformedAIR
from imagewire.tasks.inputs import task_error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("runware:101@1", AIR("runware", "101", "1")),
        ("civitai:101055@128078", AIR("civitai", "101055", "128078")),
        ("imagewire:sdxl-base@1", AIR("imagewire", "sdxl-base", "1")),
        ("my_site-2:Model.Name_v2@v1.0-beta", AIR("my_site-2", "Model.Name_v2", "v1.0-beta")),
        # The source is case-insensitive and stored lower-cased; the id and version keep their case.
        ("RunWare:AbC@XyZ", AIR("runware", "AbC", "XyZ")),
        ("  runware:101@1\n", AIR("runware", "101", "1")),
    ],
)
def test_valid_air_ids_parse(text: str, expected: AIR) -> None:
    assert parse_air(text) == expected


def test_an_air_prints_in_its_wire_form() -> None:
    assert str(AIR("civitai", "101055", "128078")) == "civitai:101055@128078"
    assert str(parse_air("Runware:101@1")) == "runware:101@1"


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "",
        "runware:101",
        "runware@1",
        ":101@1",
        "runware:@1",
        "runware:101@",
        "run ware:101@1",
        "runware:10 1@1",
        "runware:101@1@2",
        "runware:101:2@1",
        "runware:101@1/../x",
        "rünware:101@1",
        123,
        None,
    ],
)
def test_malformed_air_ids_are_rejected_against_model(text: Any) -> None:
    with pytest.raises(MalformedAIR) as caught:
        parse_air(text)
    error = task_error(caught.value, "model")
    assert error.code == "invalidParameter"
    assert error.parameter == "model"
    assert error.type == "string"
    assert "source:id@version" in error.message
    assert "'runware:101@1'" in error.message
    assert f"received {text!r}" in error.message


def test_the_error_message_quotes_the_received_value() -> None:
    with pytest.raises(MalformedAIR) as caught:
        parse_air("abc")
    assert task_error(caught.value, "model").message == (
        "model must be an AIR id of the form source:id@version, like 'runware:101@1'; received 'abc'"
    )


def test_a_very_long_value_is_shortened_in_the_message() -> None:
    with pytest.raises(MalformedAIR) as caught:
        parse_air("x" * 5000)
    assert len(task_error(caught.value, "model").message) < 200
