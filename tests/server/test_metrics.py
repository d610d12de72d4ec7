"""/metrics in Prometheus' text format (read back with prometheus_client's own parser), values that move
when tasks run, readiness and liveness, and the status numbers the web page shows."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.timing import seconds
from tests.wire import Wire, eventually, inference


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=seconds(30)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = await asyncio.to_thread(get, f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_when_tasks_run(server):
    before = await scrape(server)
    wire = await Wire.open(server.url)
    assert await wire.run(inference(numberResults=2))
    assert (await wire.error(inference(width=100)))["code"] == "invalidWidth"
    during = await scrape(server)
    assert value(during, "imagewire_connections") == 1
    assert value(during, "imagewire_sessions") >= 1
    await wire.close()

    async def counted() -> dict | None:
        # A task is counted as it ends, a moment after its last answer went out.
        samples = await scrape(server)
        done = value(samples, "imagewire_tasks_total", task_type="imageInference", outcome="success")
        return samples if done > value(before, "imagewire_tasks_total", task_type="imageInference",
                                       outcome="success") else None

    after = await eventually(counted)
    success = value(after, "imagewire_tasks_total", task_type="imageInference", outcome="success")
    refused = value(after, "imagewire_tasks_total", task_type="imageInference", outcome="invalidWidth")
    assert success - value(before, "imagewire_tasks_total", task_type="imageInference", outcome="success") == 1
    assert refused - value(before, "imagewire_tasks_total", task_type="imageInference", outcome="invalidWidth") == 1
    for stage in ("total", "queue", "model", "encode", "store"):
        assert value(after, "imagewire_task_stage_seconds_count", task_type="imageInference", stage=stage) >= 1
    assert value(after, "imagewire_images_per_call_count") >= 1
    assert value(after, "imagewire_images_per_call_sum") >= 2
    assert value(after, "imagewire_device_busy_seconds_total") > value(before, "imagewire_device_busy_seconds_total")
    assert 0 < value(after, "imagewire_device_busy_ratio") <= 1
    assert value(after, "imagewire_queue_depth") == 0
    assert value(after, "imagewire_loaded_models", air="imagewire:tiny@1") == 1
    assert value(after, "imagewire_ready") == 1


async def test_liveness_readiness_and_the_status_numbers(server):
    base = f"http://127.0.0.1:{server.port}"
    assert (await asyncio.to_thread(get, f"{base}/health/live"))[0] == 200
    assert (await asyncio.to_thread(get, f"{base}/health/ready"))[0] == 200
    status, body = await asyncio.to_thread(get, f"{base}/status")
    numbers = json.loads(body)
    assert status == 200 and numbers["ready"] is True and numbers["loadedModels"] == ["imagewire:tiny@1"]
    assert numbers["queued"] == 0 and 0 <= numbers["deviceBusy"] <= 1
    server.device.close_intake()  # as at the start of a shutdown
    status, body = await asyncio.to_thread(get, f"{base}/health/ready")
    assert status == 503 and json.loads(body)["status"] == "not ready"
    assert (await asyncio.to_thread(get, f"{base}/health/live"))[0] == 200
