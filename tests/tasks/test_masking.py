"""imageMasking's parts that need no server: which ids are served, the settings, boxes as pixels, the mask's
drawing and the merging of boxes that find one object twice."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch
from PIL import Image

from imagewire.server.engine.masking import FAMILIES, best_distinct, square
from imagewire.tasks import schema
from imagewire.tasks.errors import InvalidParameter
from imagewire.tasks.image_masking import Box, draw_mask, masking_settings, pixel_boxes, target


def detection(left: int, top: int, right: int, bottom: int) -> schema.Detection:
    return schema.Detection(x_min=left, y_min=top, x_max=right, y_max=bottom, confidence=0.5)


def task(**fields: object) -> schema.ImageMasking:
    return msgspec.convert({"taskType": "imageMasking", "taskUUID": "0" * 8 + "-0000-4000-8000-" + "0" * 12,
                            "model": "runware:35@1", **fields}, schema.ImageMasking)


@pytest.mark.parametrize(("model", "looked_for"), [("runware:35@1", "face"), ("RUNWARE:35@8", "face"),
                                                   ("runware:35@3", "hand"), (" runware:35@5", "person")])
def test_each_box_id_names_what_it_looks_for(model, looked_for):
    assert target(model) == looked_for


@pytest.mark.parametrize(("model", "said"), [("runware:35@14", "lips"), ("runware:35@16", "received 'runware:35@16'"),
                                             ("imagewire:tiny-masking@1", "received")])
def test_other_ids_are_refused_naming_the_ones_served(model, said):
    with pytest.raises(InvalidParameter) as refused:
        target(model)
    assert refused.value.parameter == "model" and said in str(refused.value)
    assert refused.value.allowed_values == [f"runware:35@{number}" for number in range(1, 9)]


def test_settings_come_from_the_top_level_or_settings_with_the_pages_defaults():
    chosen = masking_settings(task())
    assert (chosen.confidence, chosen.max_detections, chosen.padding, chosen.blur) == (0.25, 6, 4, 4)
    chosen = masking_settings(task(maskBlur=0, settings={"confidence": 0.5, "maskBlur": 0}))
    assert (chosen.confidence, chosen.blur) == (0.5, 0)
    with pytest.raises(InvalidParameter) as refused:
        masking_settings(task(maskPadding=1, settings={"maskPadding": 2}))
    assert refused.value.parameter == "settings.maskPadding"


def test_boxes_become_the_pixels_they_touch_within_the_picture():
    boxes = [Box(2.4, 3.6, 10.2, 8.0, 0.9), Box(-5.0, 20.0, 4.5, 40.0, 0.8), Box(50.0, 0.0, 60.0, 5.0, 0.7),
             Box(3.0, 3.0, 3.0, 9.0, 0.6)]
    assert [(d.x_min, d.y_min, d.x_max, d.y_max) for d in pixel_boxes(boxes, 32, 30)] == [
        (2, 3, 11, 8), (0, 20, 5, 30)]  # outside the picture, or empty: left out


def test_without_blur_the_mask_is_white_exactly_over_the_grown_boxes():
    mask = np.asarray(draw_mask(40, 30, [detection(5, 5, 10, 12), detection(30, 25, 40, 30)], padding=3, blur=0))
    expected = np.zeros((30, 40), dtype=np.uint8)
    expected[2:15, 2:13] = 255
    expected[22:30, 27:40] = 255
    assert mask.shape == (30, 40) and np.array_equal(mask, expected)
    assert np.asarray(draw_mask(8, 6, [], padding=4, blur=4)).max() == 0


def test_blur_fades_outwards_over_that_many_pixels():
    mask = np.asarray(draw_mask(60, 20, [detection(20, 5, 30, 15)], padding=0, blur=5)).astype(int)
    row = mask[10]
    assert (row[20:30] == 255).all()  # the box itself stays white
    fade = row[30:37]
    assert list(fade) == sorted(fade, reverse=True) and 0 < fade[0] < 255 and fade[4] > 0 and fade[5] == 0
    assert list(row[13:20]) == list(fade[::-1])  # the same on every side
    assert (mask == 255).sum() == 100


def test_boxes_finding_one_object_twice_are_merged_into_the_best():
    corners = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.7, 0.4])
    assert best_distinct(corners, scores, limit=10) == [1, 2]
    assert best_distinct(corners, scores, limit=1) == [1]


def test_owlv2_sees_the_picture_padded_below_and_right_and_owlvit_stretched():
    picture = Image.new("RGB", (160, 64), (255, 0, 0))
    padded, span = square(picture, 32, FAMILIES["owlv2"])
    assert padded.size == (32, 32) and span == (160, 160)  # box coordinates are fractions of the padded square
    assert padded.getpixel((16, 4)) == (255, 0, 0) and padded.getpixel((16, 28)) == (128, 128, 128)
    stretched, span = square(picture, 32, FAMILIES["owlvit"])
    assert span == (160, 64) and stretched.getpixel((16, 28)) == (255, 0, 0)
