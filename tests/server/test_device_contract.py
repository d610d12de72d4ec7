"""One behaviour for every device behind the task layer's ``Device`` seam (``tasks/jobs.py``).

Each case is written once, against a ``Bench``: a started device, a way to keep it busy (``hold``) and let it go
(``release``), and the log its engine keeps of each call. Here the cases run on this process's ``DeviceQueue`` with
``GateEngine`` (``fake``) and with the diffusers engine on the embedded tiny model (``diffusers``);
``tests/cluster/test_device_contract_ray.py`` runs the same functions on ``RayDevice`` and a Ray Serve replica.

``GateEngine`` is the shipped fake engine behind a gate: it holds a call while a job of it says "hold" and the test
has not released it (a file it creates), fails to load a model whose AIR says "unloadable", and writes what it does
to another file: files, because on Ray the engine runs in a replica's process. The diffusers engine holds nothing:
a held job there is a long one (``LONG`` steps), cancelled at its first step. Cases that need a call or a load to
fail take ``gated``: only an engine of the test's own fails on request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imagewire.air_registry.catalog import Catalog
from imagewire.server.device import Cancelled, DeviceQueue, DeviceService, JobStream
from imagewire.server.fake_engine import FakeEngine
from imagewire.tasks.errors import InferenceError
from imagewire.tasks.get_response import RecordedErrors
from imagewire.tasks.jobs import (
    DeviceEvent,
    Emit,
    Finished,
    InferenceJob,
    Job,
    JobEvent,
    Queued,
    Results,
    Step,
)
from tests.engines import data_dir_with_models, diffusers_engine
from tests.timing import seconds

TINY = Catalog.load().resolve("imagewire:tiny@1")
LOG = "log.jsonl"  # one line per call started, stopped (cancelled) and finished
LONG = 40          # steps of a held job on the diffusers engine: a few seconds, long enough to cancel it mid-call


def released(folder: Path, task_uuid: str) -> Path:
    return folder / f"release-{task_uuid}"


def write_log(folder: Path, **entry: Any) -> None:
    with (folder / LOG).open("a") as log:
        log.write(json.dumps(entry) + "\n")


class GateEngine(FakeEngine):
    """The shipped fake engine (``--engine fake``) behind a gate: reports step 1 of 2 for each job of a call, then
    holds the call while a job of it that is not cancelled says "hold" and has not been released; stops the call
    once all its jobs are cancelled; then answers as the fake does. A job whose prompt says "explode" fails its
    call (as a device out of memory would); one that says "refuse" answers with a TaskError whose constructor is
    not the base class's. Loading a model whose AIR says "unloadable" fails, as a model without weights would."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def load(self, model: Any) -> None:
        if "unloadable" in model.air:
            raise OSError(f"no weights for {model.air}")
        super().load(model)

    def run(self, jobs: Sequence[Job], emit: Emit) -> None:
        names = [job.task_uuid for job in jobs]
        write_log(self.folder, call=names)
        for index, job in enumerate(jobs):
            emit.progress(index, Step(tuple(range(job.images)), 1, 2))
        deadline = time.monotonic() + seconds(120)
        while True:
            if all(emit.cancelled(index) for index in range(len(jobs))):
                write_log(self.folder, stopped=names)
                raise Cancelled("every job of the call was cancelled")
            if not any("hold" in job.prompt and not emit.cancelled(index)
                       and not released(self.folder, job.task_uuid).exists()
                       for index, job in enumerate(jobs) if isinstance(job, InferenceJob)):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the test never released the call")
            time.sleep(0.01)
        for job in jobs:
            assert isinstance(job, InferenceJob)
            if "explode" in job.prompt:
                # Not an out-of-memory error: that would also lower the model's batch size for later cases.
                raise RuntimeError("the model failed on this input")
            if "refuse" in job.prompt:
                raise RecordedErrors([{"message": f"{job.task_uuid} refused", "code": "refused"}])
        super().run(jobs, emit)
        write_log(self.folder, ran=names)


class LoggedEngine:
    """The diffusers engine, keeping ``GateEngine``'s log of its calls."""

    def __init__(self, engine: Any, folder: Path) -> None:
        self.engine = engine
        self.folder = folder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, jobs: Sequence[Job], emit: Emit) -> None:
        names = [job.task_uuid for job in jobs]
        write_log(self.folder, call=names)
        try:
            self.engine.run(jobs, emit)
        except Cancelled:
            write_log(self.folder, stopped=names)
            raise
        write_log(self.folder, ran=names)


class Watched:
    """A submitted job and what its ``on_event`` heard."""

    def __init__(self, device: DeviceService, job: InferenceJob) -> None:
        self.job = job
        self.heard: list[JobEvent] = []
        self.handle = device.submit(job, on_event=self.heard.append)

    @property
    def queued(self) -> bool:
        return any(isinstance(event, Queued) for event in self.heard)

    @property
    def running(self) -> bool:
        return any(isinstance(event, Step) for event in self.heard)

    async def results(self) -> list[Any]:
        """Every result, once the job is over (raises what it failed with)."""

        async def collect() -> list[Any]:
            return [item async for chunk in self.handle for item in chunk]

        return await asyncio.wait_for(collect(), seconds(120))


async def until(check: Callable[[], bool], what: str, timeout: float = seconds(60)) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"not {what} after {timeout} s"
        await asyncio.sleep(0.02)


@dataclass
class Bench:
    """A started device and the means to arrange its queue."""

    device: DeviceService
    folder: Path
    weights: Path
    gated: bool        # GateEngine: held jobs wait for ``release``; otherwise a held job is a long one
    prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    watched: list[Watched] = field(default_factory=list)

    def job(self, name: str, *, owner: str = "a", key: int = 0, prompt: str = "a lighthouse",
            seeds: Sequence[int] = (1,), steps: int = 2, held: bool = False) -> InferenceJob:
        """A job of the tiny model; jobs of equal ``key`` and ``steps`` may share a call, others may not. A ``held``
        one runs ``LONG`` steps, and on ``GateEngine`` holds its call until ``release``d or cancelled."""
        return InferenceJob(task_uuid=f"{self.prefix}-{name}", owner=owner, model=TINY, weights=self.weights,
                            prompt=prompt + (" hold" if held else ""), negative_prompt=None, width=128, height=128,
                            steps=LONG if held else steps, cfg_scale=7.0 + key, sampler=None, seeds=list(seeds))

    def submit(self, job: InferenceJob) -> Watched:
        watched = Watched(self.device, job)
        self.watched.append(watched)
        return watched

    async def hold(self) -> Watched:
        """Keep the device busy with a held job of its own (``key`` -1) until ``release``, or for a few seconds;
        jobs submitted meanwhile wait together."""
        blocker = self.submit(self.job("blocker", owner="blocker", key=-1, held=True))
        await until(lambda: blocker.running, "running")
        return blocker

    async def all_queued(self, *watched: Watched) -> None:
        await until(lambda: all(job.queued for job in watched), "queued")

    async def gone_from_device(self, watched: Watched) -> None:
        """Wait until the device has let go of a cancelled job. At once on this process's queue; a Ray replica lets
        go when Serve's cancel reaches it, which its entry on the board shows (``RayDevice.replicas``)."""
        await until(lambda: not any(watched.job.task_uuid in state.get("jobs", {})
                                    for state in getattr(self.device, "replicas", [])), "let go of")

    def release(self, name: str = "blocker") -> None:
        if self.gated:
            released(self.folder, f"{self.prefix}-{name}").touch()

    def log(self) -> list[tuple[str, list[str]]]:
        """What the engine did with this bench's jobs: (call | stopped | ran, names without the prefix)."""
        entries = []
        if (self.folder / LOG).exists():
            for line in (self.folder / LOG).read_text().splitlines():
                ((what, names),) = json.loads(line).items()
                if names and all(name.startswith(self.prefix + "-") for name in names):
                    entries.append((what, [name.removeprefix(self.prefix + "-") for name in names]))
        return entries

    def calls(self) -> list[list[str]]:
        """The jobs of each call, in the order the calls started; the blocker's left out."""
        return [names for what, names in self.log() if what == "call" and names != ["blocker"]]

    async def finish(self) -> None:
        """Let every job of the test end, so that the next test finds an idle device."""
        self.release()
        for watched in self.watched:
            watched.handle.cancel()
        await until(lambda: self.device.pending == 0, "idle")


def seeds_of(results: list[Any]) -> list[int]:
    return [image.seed for image in results]


def events_of(handle: Any) -> Callable[[], Awaitable[list[DeviceEvent]]]:
    """Every event of a handle's stream (both devices' handles are ``JobStream``s)."""
    assert isinstance(handle, JobStream)

    async def collect() -> list[DeviceEvent]:
        return [event async for event in handle.events()]

    return lambda: asyncio.wait_for(collect(), seconds(120))


# ---------------------------------------------------------------- the cases


async def test_jobs_of_one_owner_run_in_the_order_they_were_submitted(bench: Bench) -> None:
    await bench.hold()
    # Distinct keys: each is a call of its own, so the calls' order is the order the device took them in.
    jobs = [bench.submit(bench.job(name, key=key)) for key, name in enumerate(["first", "second", "third", "fourth"])]
    await bench.all_queued(*jobs)
    bench.release()
    for job in jobs:
        assert len(await job.results()) == 1
    assert bench.calls() == [["first"], ["second"], ["third"], ["fourth"]]


async def test_jobs_waiting_together_with_one_batch_key_share_a_call(bench: Bench) -> None:
    await bench.hold()
    together = [bench.submit(bench.job(name, owner=owner, seeds=[seed]))
                for name, owner, seed in (("x", "a", 1), ("y", "b", 2), ("z", "a", 3))]
    apart = bench.submit(bench.job("other", owner="b", key=1, seeds=[4]))
    await bench.all_queued(*together, apart)
    bench.release()
    # Each job gets its own images, by the seeds it asked for, though they came from one call.
    assert [seeds_of(await job.results()) for job in together] == [[1], [2], [3]]
    assert seeds_of(await apart.results()) == [4]
    calls = bench.calls()
    assert sorted(map(sorted, calls)) == [["other"], ["x", "y", "z"]], calls


async def test_a_cancelled_waiting_job_never_runs_and_ends_with_no_results(bench: Bench) -> None:
    await bench.hold()
    cancelled = bench.submit(bench.job("cancelled"))
    after = bench.submit(bench.job("after", key=1))
    await bench.all_queued(cancelled, after)
    cancelled.handle.cancel()
    assert await cancelled.results() == []
    await bench.gone_from_device(cancelled)
    bench.release()
    # The job behind it ran, so the device was past the place where the cancelled one waited.
    assert len(await after.results()) == 1
    assert bench.calls() == [["after"]]
    assert cancelled.heard and all(isinstance(event, Queued) for event in cancelled.heard)


async def test_a_cancelled_running_job_stops_its_call(bench: Bench) -> None:
    await bench.hold()
    running = bench.submit(bench.job("running", held=True))
    await bench.all_queued(running)
    bench.release()
    await until(lambda: running.running, "running")
    running.handle.cancel()
    assert await running.results() == []
    after = bench.submit(bench.job("after", key=1))
    assert len(await after.results()) == 1
    # The call stopped before its end: the engine says so, and it did not run to its last step.
    await until(lambda: ("stopped", ["running"]) in bench.log(), "stopped")
    assert ("ran", ["running"]) not in bench.log()


async def test_a_cancelled_running_job_leaves_its_batch_mates_running(bench: Bench) -> None:
    await bench.hold()
    cancelled = bench.submit(bench.job("cancelled", seeds=[1], held=True))
    kept = bench.submit(bench.job("kept", owner="b", seeds=[2], steps=LONG))
    await bench.all_queued(cancelled, kept)
    bench.release()
    await until(lambda: cancelled.running, "running")
    cancelled.handle.cancel()
    assert await cancelled.results() == []
    assert seeds_of(await kept.results()) == [2]
    assert bench.calls() == [["cancelled", "kept"]]
    # Nothing reached the cancelled job's listener after the cancel: its last event is the step it was cancelled at.
    steps = [event for event in cancelled.heard if isinstance(event, Step)]
    assert steps and cancelled.heard[-1] is steps[-1]


async def test_a_failing_job_leaves_its_batch_mates_their_own_answers(gated: Bench) -> None:
    bench = gated
    await bench.hold()
    failing = bench.submit(bench.job("failing", prompt="explode", seeds=[1]))
    refused = bench.submit(bench.job("refused", owner="b", prompt="refuse", seeds=[2]))
    kept = bench.submit(bench.job("kept", owner="c", seeds=[3]))
    await bench.all_queued(failing, refused, kept)
    bench.release()
    with pytest.raises(InferenceError, match=r"Inference failed \(RuntimeError\)"):
        await failing.results()
    # A TaskError whose constructor takes other arguments than the message arrives whole, attributes and all.
    with pytest.raises(RecordedErrors) as refusal:
        await refused.results()
    assert refusal.value.items == [{"message": f"{bench.prefix}-refused refused", "code": "refused"}]
    assert str(refusal.value) == f"{bench.prefix}-refused refused"
    assert seeds_of(await kept.results()) == [3]
    # The shared call failed, then each job ran alone: each answer is its own. (On Ray the three reach the replica
    # in whichever order Serve delivers them.)
    first, *alone = bench.calls()
    assert sorted(first) == ["failing", "kept", "refused"]
    assert alone == [[name] for name in first]


async def test_events_come_in_order_queued_then_steps_then_results_then_the_end(bench: Bench) -> None:
    await bench.hold()
    watched = bench.submit(bench.job("watched", seeds=[5, 6], steps=4))
    await bench.all_queued(watched)
    bench.release()
    events = await events_of(watched.handle)()
    kinds = [type(event).__name__ for event in events]
    first_step = kinds.index("Step")
    first_results = kinds.index("Results")
    assert set(kinds[:first_step]) == {"Queued"}, kinds
    assert set(kinds[first_step:first_results]) == {"Step"}, kinds
    assert isinstance(events[-1], Finished) and "Queued" not in kinds[first_step:], kinds
    steps = [event.done for event in events if isinstance(event, Step)]
    assert steps == sorted(steps), steps
    assert [image.seed for event in events if isinstance(event, Results) for image in event.chunk] == [5, 6]
    assert events[-1].compute_seconds > 0
    # The listener heard the same positions and steps, in the same order.
    assert watched.heard == [event for event in events if isinstance(event, (Queued, Step))]


async def test_a_preloaded_model_is_loaded_once_its_preload_is_done(gated: Bench) -> None:
    bench = gated
    model = dataclasses.replace(TINY, air=f"test:{bench.prefix}-preloaded@1")
    assert model.air not in bench.device.loaded_models
    await asyncio.wait_for(asyncio.wrap_future(bench.device.preload(model)), seconds(60))
    # Done means loaded, and already visible where modelSearch and /metrics look.
    assert bench.device.loaded_models.get(model.air) == "device"


async def test_a_preload_that_fails_holds_why(gated: Bench) -> None:
    bench = gated
    model = dataclasses.replace(TINY, air=f"test:{bench.prefix}-unloadable@1")
    with pytest.raises(Exception, match=f"no weights for {model.air}"):
        await asyncio.wait_for(asyncio.wrap_future(bench.device.preload(model)), seconds(60))
    assert model.air not in bench.device.loaded_models


# ---------------------------------------------------------------- the devices of this process


@pytest.fixture(scope="module")
def diffusers_device(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[DeviceQueue, Path]]:
    """One diffusers engine for the module: it loads the tiny model once."""
    folder = tmp_path_factory.mktemp("diffusers-device")
    data = data_dir_with_models(folder / "data", models_dir)
    device = DeviceQueue(lambda: LoggedEngine(diffusers_engine(data), folder),
                         queue_size=16, max_batch_size=4)
    device.start()
    yield device, folder
    device.stop(timeout=seconds(60))


async def _local_bench(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bench]:
    if request.param == "fake":
        device = DeviceQueue(lambda: GateEngine(tmp_path), queue_size=16, max_batch_size=4)
        await asyncio.to_thread(device.start)
        bench = Bench(device, tmp_path, weights=tmp_path / "unused", gated=True)
    else:
        from imagewire.air_registry.weights import locate_weights

        device, folder = request.getfixturevalue("diffusers_device")
        weights = locate_weights(TINY, data_dir=folder / "data", allow_downloads=False)
        bench = Bench(device, folder, weights=weights, gated=False)
    try:
        yield bench
    finally:
        await bench.finish()
        if request.param == "fake":
            await asyncio.to_thread(device.stop, seconds(30))


@pytest.fixture(params=["fake", "diffusers"])
async def bench(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bench]:
    async for made in _local_bench(request, tmp_path):
        yield made


@pytest.fixture(params=["fake"])
async def gated(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bench]:
    async for made in _local_bench(request, tmp_path):
        yield made
