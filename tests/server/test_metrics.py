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


def get_with(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=seconds(30)) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


async def test_reports_answer_this_servers_own_names_or_a_key_never_a_rebound_name(start_server):
    server = await start_server(allowed_hosts=("imagewire.internal",), public_url="https://images.example.com")
    base = f"http://127.0.0.1:{server.port}"
    for path in ("/status", "/metrics"):
        async def fetch(host: str, path: str = path, **headers: str) -> int:
            status, _, _ = await asyncio.to_thread(get_with, base + path, {"Host": host, **headers})
            return status

        # What an operator, a scraper or the page itself sends.
        for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "[::1]:8080",
                     "imagewire.internal:8080", "images.example.com"):
            assert await fetch(host) == 200, (path, host)
        # A page of another site whose name now points here.
        assert await fetch("attacker.example:8080") == 403
        assert await fetch("attacker.example", Authorization="Bearer wrong-key") == 403
        assert await fetch("attacker.example", Authorization="Bearer test-key") == 200
    status, _, body = await asyncio.to_thread(get_with, base + "/status", {"Host": "attacker.example"})
    assert "--allowed-host" in body and "ready" not in body


async def test_any_host_when_the_operator_says_so(start_server):
    server = await start_server(allowed_hosts=("*",))
    status, _, _ = await asyncio.to_thread(get_with, f"http://127.0.0.1:{server.port}/metrics",
                                           {"Host": "anything.example"})
    assert status == 200


async def test_no_other_site_may_frame_the_page_or_the_answers(server):
    base = f"http://127.0.0.1:{server.port}"
    for path in ("/", "/status", "/health", "/v1", "/image/00000000-0000-0000-0000-000000000000.png"):
        _, headers, _ = await asyncio.to_thread(get_with, base + path, {})
        assert headers.get("X-Frame-Options") == "DENY", path
        assert "frame-ancestors 'none'" in headers.get("Content-Security-Policy", ""), path
        assert headers.get("X-Content-Type-Options") == "nosniff", path
