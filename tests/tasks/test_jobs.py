"""A job's events cross process boundaries (Ray pickles what a replica streams to its gateway)."""

from __future__ import annotations

import pickle

from PIL import Image

from imagewire.tasks.errors import InvalidParameter, TaskError
from imagewire.tasks.get_response import RecordedErrors
from imagewire.tasks.jobs import Failed, Finished, GeneratedImage, Queued, Results, Step


def round_trip(value: object) -> object:
    return pickle.loads(pickle.dumps(value))


def test_a_failed_event_keeps_its_error_class_message_and_attributes() -> None:
    error = InvalidParameter("width must be a multiple of 64", parameter="width", allowed_values=[64, 128],
                             code="invalidWidth")
    back = round_trip(Failed(error))
    assert isinstance(back, Failed) and type(back.error) is InvalidParameter
    assert (back.error.message, back.error.parameter, back.error.allowed_values, back.error.code) == (
        "width must be a multiple of 64", "width", [64, 128], "invalidWidth")
    assert str(back.error) == "width must be a multiple of 64"


def test_an_error_whose_constructor_takes_no_message_survives_the_trip() -> None:
    # Pickle rebuilds an exception by calling its class with its args: RecordedErrors takes a list of items, so
    # that would fail; the event carries class, message and attributes instead.
    items = [{"message": "the model failed to load", "code": "modelNotFound"}]
    back = round_trip(Failed(RecordedErrors(items)))
    assert isinstance(back, Failed) and isinstance(back.error, RecordedErrors)
    assert back.error.items == items and back.error.message == "the model failed to load"
    assert isinstance(back.error, TaskError)


def test_the_other_events_travel_as_they_are() -> None:
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    events = [Queued(3), Step((0, 1), 2, 4), Results([GeneratedImage(0, 7, image, 0.5)]), Finished(0.1, 0.2, 0.3)]
    back = [round_trip(event) for event in events]
    assert back[:2] == events[:2] and back[3] == events[3]
    assert isinstance(back[2], Results)
    (generated,) = back[2].chunk
    assert (generated.index, generated.seed, generated.seconds) == (0, 7, 0.5)
    assert generated.image.getpixel((0, 0)) == (10, 20, 30)
