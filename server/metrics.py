"""Prometheus metrics at ``GET /metrics``, through prometheus_client.

What moves with each task is counted where it happens (the runner at the end of a task, the device
worker after each call); what is a state (queue depth, loaded models, connections, device memory) is
read when Prometheus scrapes. The status panel of the web page reads the same numbers (``status``).

Each server has a registry of its own, so several servers in one process (tests) do not mix.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUSY_WINDOW_SECONDS = 60.0
# Task stages take from a millisecond (a small PNG) to minutes (a large batch on a slow device).
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class State:
    """What the server is now, as the scrape and the status panel read it."""

    queue_depth: Callable[[], int]
    loaded_models: Callable[[], list[str]]
    device_memory: Callable[[], Mapping[str, int]]   # kind (allocated, reserved) → bytes; empty on a CPU
    connections: Callable[[], int]
    sessions: Callable[[], int]
    ready: Callable[[], bool]
    held_input_pixels: Callable[[], int] = lambda: 0
    inbound_bytes: Callable[[], int] = lambda: 0        # large inbound messages being received or handled
    inbound_waiting: Callable[[], int] = lambda: 0      # sockets and requests waiting for inbound room
    # (model AIR, where: the device's name or "cpu" for host RAM) → bytes of its weights there
    model_bytes: Callable[[], Mapping[tuple[str, str], int]] = lambda: {}
    # With --engine ray: each replica's state as the board last showed it (``server/board.py``); None without.
    replicas: Callable[[], Sequence[Mapping[str, Any]]] | None = None


class BusyClock:
    """Device time: the total, and the share of the last minute spent in calls. Written by the device
    worker, read by the event loop."""

    def __init__(self, window: float = BUSY_WINDOW_SECONDS) -> None:
        self.window = window
        self.total = 0.0
        self._calls: deque[tuple[float, float]] = deque()  # (start, end), monotonic

    def add(self, started: float, ended: float) -> None:
        self.total += ended - started
        self._calls.append((started, ended))
        while self._calls and self._calls[0][1] < ended - self.window:
            self._calls.popleft()

    def ratio(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        since = now - self.window
        busy = sum(min(end, now) - max(start, since) for start, end in list(self._calls) if end > since)
        return max(0.0, min(1.0, busy / self.window))


class Metrics:
    def __init__(self, state: State, *, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        self.state = state
        self.busy = BusyClock()
        self.tasks = Counter("imagewire_tasks", "Tasks finished, by type and outcome (an error code or success).",
                             ["task_type", "outcome"], registry=self.registry)
        self.stages = Histogram("imagewire_task_stage_seconds", "Seconds a task spent in each stage.",
                                ["task_type", "stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.images_per_call = Histogram(
            "imagewire_images_per_call", "Images (or other results) made by one pipeline call.",
            buckets=tuple(range(1, max(max_batch_size, 1) + 1)), registry=self.registry)
        self.device_seconds = Counter("imagewire_device_busy_seconds", "Seconds the device spent in calls.",
                                      registry=self.registry)
        self.registry.register(_StateCollector(self))

    def task_finished(self, task_type: str, outcome: str, total_seconds: float, stages: Mapping[str, float]) -> None:
        self.tasks.labels(task_type, outcome).inc()
        self.stages.labels(task_type, "total").observe(total_seconds)
        for stage, seconds in stages.items():
            self.stages.labels(task_type, stage).observe(seconds)

    def device_call(self, results: int, started: float, ended: float) -> None:
        """Called by the device worker after each call."""
        self.images_per_call.observe(results)
        self.device_seconds.inc(ended - started)
        self.busy.add(started, ended)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def status(self) -> dict[str, Any]:
        """The status panel's numbers, from the same sources as the scrape."""
        state = self.state
        return {"ready": state.ready(), "queued": state.queue_depth(), "loadedModels": state.loaded_models(),
                "deviceBusy": round(self.busy.ratio(), 3), "deviceMemoryBytes": dict(state.device_memory()),
                "connections": state.connections(), "sessions": state.sessions(),
                "tasks": {f"{labels['task_type']}/{labels['outcome']}": int(value)
                          for labels, value in _counter_values(self.tasks)}}


class _StateCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        state = self.metrics.state
        yield GaugeMetricFamily("imagewire_queue_depth", "Jobs waiting for the device.", value=state.queue_depth())
        yield GaugeMetricFamily("imagewire_device_busy_ratio",
                                f"Share of the last {BUSY_WINDOW_SECONDS:g} s the device spent in calls.",
                                value=self.metrics.busy.ratio())
        loaded = GaugeMetricFamily("imagewire_loaded_models",
                                   "Models on the device, with the add-ons loaded into them (1 each).", labels=["air"])
        for air in state.loaded_models():
            loaded.add_metric([air], 1)
        yield loaded
        model_bytes = GaugeMetricFamily("imagewire_model_bytes",
                                        "Bytes of each loaded model's weights by where they wait between calls "
                                        "(its memory plan): the device, or cpu for host RAM.",
                                        labels=["model", "device"])
        for (air, where), value in state.model_bytes().items():
            model_bytes.add_metric([air, where], value)
        yield model_bytes
        memory = GaugeMetricFamily("imagewire_device_memory_bytes", "Memory torch holds on the GPU.", labels=["kind"])
        for kind, value in state.device_memory().items():
            memory.add_metric([kind], value)
        yield memory
        if state.replicas is not None:
            yield from _replica_metrics(state.replicas())
        yield GaugeMetricFamily("imagewire_connections", "Open WebSocket connections.", value=state.connections())
        yield GaugeMetricFamily("imagewire_sessions", "Sessions, attached or waiting to be resumed.",
                                value=state.sessions())
        yield GaugeMetricFamily("imagewire_held_input_pixels",
                                "Decoded input image pixels held by unfinished tasks (--max-waiting-megapixels).",
                                value=state.held_input_pixels())
        yield GaugeMetricFamily("imagewire_inbound_message_bytes",
                                "Bytes of large inbound messages being received or handled (--max-inbound-mib).",
                                value=state.inbound_bytes())
        yield GaugeMetricFamily("imagewire_inbound_waiting",
                                "Sockets and REST requests whose next message waits for inbound room.",
                                value=state.inbound_waiting())
        yield GaugeMetricFamily("imagewire_ready", "1 when the server takes tasks.", value=int(state.ready()))


def _replica_metrics(replicas: Sequence[Mapping[str, Any]]) -> Iterator[Metric]:
    """The device figures of each replica (``--engine ray``), labelled by replica and by node (its Ray node id:
    two nodes may share an address). The unlabelled device figures above are the gateway's view: its own jobs'
    queue and device time, the models and memory of all replicas together."""
    labels = ["replica", "node"]
    count = GaugeMetricFamily("imagewire_replicas", "Replicas on the board (each posts its state every 2 s).",
                              value=len(replicas))
    queue = GaugeMetricFamily("imagewire_replica_queue_depth", "Jobs waiting for the replica's device, from every "
                              "gateway.", labels=labels)
    running = GaugeMetricFamily("imagewire_replica_running_jobs", "Jobs the replica's device has started and not "
                                "finished.", labels=labels)
    busy = GaugeMetricFamily("imagewire_replica_device_busy_ratio",
                             f"Share of the last {BUSY_WINDOW_SECONDS:g} s the replica's device spent in calls.",
                             labels=labels)
    loaded = GaugeMetricFamily("imagewire_replica_loaded_models", "Models on the replica's device (1 each).",
                               labels=[*labels, "air"])
    memory = GaugeMetricFamily("imagewire_replica_device_memory_bytes", "Memory torch holds on the replica's GPU.",
                               labels=[*labels, "kind"])
    for replica in replicas:
        names = [replica["name"], replica.get("node_id", "")]
        queue.add_metric(names, replica.get("pending", 0))
        running.add_metric(names, max(0, len(replica.get("jobs", {})) - replica.get("pending", 0)))
        busy.add_metric(names, replica.get("device_busy_ratio", 0.0))
        for air, where in replica.get("loaded_models", {}).items():
            if where == "device":
                loaded.add_metric([*names, air], 1)
        for kind, value in replica.get("device_memory", {}).items():
            memory.add_metric([*names, kind], value)
    yield from (count, queue, running, busy, loaded, memory)


def placed_bytes(plans: Mapping[str, Any], loaded: Mapping[str, str]) -> dict[tuple[str, str], int]:
    """Bytes of each model's weights by where they wait between calls: its plan's device share on its device
    and the rest in host RAM ("cpu"); all of it in host RAM while the model was moved there (``--ram-models``)."""
    found: dict[tuple[str, str], int] = {}
    for air, plan in plans.items():
        on_device = plan.device_bytes if loaded.get(air) == "device" else 0
        if plan.device != "cpu":
            found[(air, plan.device)] = on_device
            found[(air, "cpu")] = plan.model_bytes - on_device
        else:
            found[(air, "cpu")] = plan.model_bytes
    return found


def _counter_values(counter: Counter) -> Iterator[tuple[dict[str, str], float]]:
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                yield sample.labels, sample.value
