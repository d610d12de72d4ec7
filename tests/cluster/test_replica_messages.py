"""What crosses between a Ray replica and its gateway (``server/replica.py`` ``Replica._messages``): encoded images,
not pixels, for a task that only stores them; steps only for a task that reports progress; a job's last images
and its end in one message; weights looked for on the replica's machine.

One Ray cluster of this machine for the module, with one CPU replica on the real engine and the tiny model, and
this process's own device queue on the same engine (``--engine local``) to compare with. The gateway's side is
watched where the replica's messages arrive (``RayDevice._batches``).
Run with ``python -m pytest -m cluster tests/cluster/test_replica_messages.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imagewire.air_registry import Catalog, locate_weights
from imagewire.server.config import Config
from imagewire.server.device import DeviceQueue
from imagewire.storage import OUTPUT_FORMATS
from imagewire.tasks.errors import ModelNotFound
from imagewire.tasks.jobs import (
    DeviceEvent,
    EncodedImage,
    Failed,
    Finished,
    GeneratedImage,
    ImageEncoding,
    InferenceJob,
    Queued,
    Results,
    Step,
)
from tests.cluster.replica_beside_local import ray_beside_local, record_messages
from tests.engines import data_dir_with_models
from tests.timing import seconds

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install -e '.[cluster]'"),
]

TINY = Catalog.load().resolve("imagewire:tiny@1")
# Where the gateway leaves a job's weights: it hands the catalog entry over unchecked (``Settings.weights_on_device``),
# so a replica that did not look for them itself would fail to load the model from here.
UNLOOKED = Path("weights-the-gateway-did-not-look-for")


@dataclasses.dataclass
class Devices:
    ray: Any
    local: DeviceQueue
    data_dir: Path


@pytest.fixture(scope="module")
def devices(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devices]:
    data = data_dir_with_models(tmp_path_factory.mktemp("replica-messages") / "data", models_dir)
    config = Config(engine="ray", device="cpu", data_dir=data, replicas=1, queue_size=8, max_batch_size=4,
                    max_passed_over=0, log_level="WARNING")
    with ray_beside_local(config) as (ray_device, local):
        yield Devices(ray_device, local, data)


@pytest.fixture
def messages(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[DeviceEvent]]]:
    return record_messages(monkeypatch)


def job(name: str, *, weights: Path, seeds: tuple[int, ...] = (11, 12), steps: int = 3, **fields: Any) -> InferenceJob:
    return InferenceJob(task_uuid=name, model=TINY, weights=weights, prompt="a lighthouse at dawn",
                        negative_prompt=None, width=128, height=128, steps=steps, cfg_scale=7.0, sampler=None,
                        seeds=list(seeds), **fields)


async def results(device: Any, submitted: InferenceJob) -> list[Any]:
    async def collect() -> list[Any]:
        return [item async for chunk in device.submit(submitted) for item in chunk]

    return await asyncio.wait_for(collect(), seconds(300))


async def local_pixels(devices: Devices, name: str, **fields: Any) -> list[Image.Image]:
    weights = locate_weights(TINY, data_dir=devices.data_dir, allow_downloads=False)
    made = await results(devices.local, job(name, weights=weights, **fields))
    return [generated.image for generated in sorted(made, key=lambda generated: generated.index)]


@pytest.mark.parametrize(("output_format", "quality"), [("PNG", 95), ("JPG", 85), ("WEBP", 70)])
async def test_a_job_that_only_stores_its_images_gets_the_bytes_the_local_engine_would_store(
        devices: Devices, messages: dict[str, list[list[DeviceEvent]]], output_format: str, quality: int) -> None:
    encoding = ImageEncoding(OUTPUT_FORMATS[output_format], quality)
    name = f"stored-{output_format}"
    made = await results(devices.ray, job(name, weights=UNLOOKED, encoding=encoding, report_steps=False))

    # Bytes crossed, not pixels: each image encoded on the replica, as the task encodes it with --engine local.
    assert [type(generated) for generated in made] == [GeneratedImage, GeneratedImage]
    assert all(isinstance(generated.image, EncodedImage) for generated in made)
    local = await local_pixels(devices, f"local-{output_format}")
    by_index = sorted(made, key=lambda generated: generated.index)
    assert [generated.image.data for generated in by_index] == [encoding.encode(picture).data for picture in local]
    assert [generated.image.size for generated in by_index] == [(128, 128), (128, 128)]
    # Without progress: its queue position, then its images and its end in one message; no step crossed.
    (position,), rest = messages[name]
    assert isinstance(position, Queued)
    assert [type(event) for event in rest] == [Results, Finished]


async def test_steps_cross_only_for_a_job_that_reports_progress(
        devices: Devices, messages: dict[str, list[list[DeviceEvent]]]) -> None:
    encoding = ImageEncoding(OUTPUT_FORMATS["PNG"], 95)
    quiet = await results(devices.ray, job("quiet", weights=UNLOOKED, seeds=(5,), steps=12, encoding=encoding,
                                           report_steps=False))
    reporting = await results(devices.ray, job("reporting", weights=UNLOOKED, seeds=(5,), steps=12,
                                               encoding=encoding, report_steps=True))
    crossed = {name: [event for batch in messages[name] for event in batch if isinstance(event, Step)]
               for name in ("quiet", "reporting")}
    assert crossed["quiet"] == []
    # At most one step per STEP_INTERVAL crosses, counting up.
    done = [step.done for step in crossed["reporting"]]
    assert done and done == sorted(set(done))
    assert len(messages["quiet"]) == 2
    # Reporting or not, the same picture.
    assert quiet[0].image.data == reporting[0].image.data


async def test_a_job_whose_task_works_on_its_pixels_gets_them(
        devices: Devices, messages: dict[str, list[list[DeviceEvent]]]) -> None:
    # A task that pastes its images back into a canvas, or checks their content, sets no encoding.
    made = await results(devices.ray, job("pixels", weights=UNLOOKED, seeds=(7,), report_steps=False))
    (generated,) = made
    assert isinstance(generated.image, Image.Image)
    (local,) = await local_pixels(devices, "local-pixels", seeds=(7,))
    assert generated.image.tobytes() == local.tobytes()


async def test_weights_missing_on_the_replica_fail_the_job_naming_the_field(devices: Devices) -> None:
    # The gateway hands the entry over unchecked; the replica's look for the weights finds them missing.
    failing = job("absent-model", weights=UNLOOKED)
    failing.model = dataclasses.replace(TINY, air="test:absent@1", problem="its folder was removed")
    (failed,) = [event async for event in devices.ray.submit(failing).events() if not isinstance(event, Queued)]
    assert isinstance(failed, Failed) and isinstance(failed.error, ModelNotFound)
    assert failed.error.parameter == "model" and "its folder was removed" in failed.error.message
