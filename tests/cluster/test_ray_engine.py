"""--engine ray end to end: two gateways (server processes) and two CPU replicas on the tiny model.

Gateway A starts a Ray cluster of this machine on loopback and deploys the replicas; gateway B joins it with
--ray-address and shares them, and asks them to preload a second model. Both keep their sessions and task records
in one Redis (--state) and their images in one bucket (--store, moto's S3 server), as a deployment of one service
over several machines does.
The replicas' board (tests/cluster/board.py) says which replica ran what and which process each one is. One
cluster for the module: starting one is the slow part (Ray, torch, the model).
Run with ``python -m pytest -m cluster tests/cluster``; the plain run deselects these.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.cluster.gateways import JOIN, ROOT, Cluster, Gateway, run_on
from tests.timing import seconds
from tests.wire import API_KEY, Wire, eventually, inference, new_uuid

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install -e '.[cluster]'"),
]

# Two catalog models on the tiny model's weights: distinct AIRs, so distinct multiplexed ids.
MODELS = ("test:tiny-b@1", "test:tiny-c@1")
# About ten seconds on a shared 2-core machine: time to find the replica running it and kill it.
SLOW = {"steps": 100, "width": 256, "height": 256}
# Far longer (a minute or more), so that it is still running when the cancel comes; cancelled, it costs seconds.
SLOWER = {"steps": 100, "width": 512, "height": 512}


# Dummy credentials for moto's S3 server on loopback: no AWS configuration of this machine is read.
S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "cluster-access-key", "AWS_SECRET_ACCESS_KEY": "cluster-secret-key",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                  "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
# A database of its own on the session's Redis, which other tests' fixtures empty.
REDIS_DATABASE = 7


BUCKET = f"cluster-{os.getpid()}"


def bucket_client(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=S3_ENVIRONMENT["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"])


def shared_state_flags(redis_server: str, s3_endpoint: str) -> tuple[str, ...]:
    bucket_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    redis_url = redis_server.rsplit("/", 1)[0] + f"/{REDIS_DATABASE}"
    return ("--state", redis_url, "--store", f"s3://{BUCKET}/images", "--s3-endpoint", s3_endpoint)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_server: str, s3_endpoint: str) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    catalog = root / "catalog.json"
    catalog.write_text(json.dumps([
        {"air": air, "name": f"tiny under another name ({air})", "architecture": "tiny", "category": "checkpoint",
         "source": "embedded", "location": "tiny-sd",
         "defaults": {"width": 128, "height": 128, "steps": 2, "scheduler": "Default", "CFGScale": 7,
                      "strength": 0.8}} for air in MODELS]))
    models = root / "models"
    models.mkdir()
    data_dirs = []
    for name in ("a", "b"):
        data = root / name
        data.mkdir()
        (data / "models").symlink_to(models, target_is_directory=True)
        data_dirs.append(data)
    # The models flags matter to the gateway that deploys the replicas: one model on each replica's device.
    flags = ("--catalog", str(catalog), "--max-loaded-models", "1", "--log-level", "INFO",
             *shared_state_flags(redis_server, s3_endpoint))
    first = Gateway(data_dirs[0], "--replicas", "2", *flags, env=S3_ENVIRONMENT)
    joined = JOIN.search(first.log)
    assert joined, first.log[-4000:]
    try:
        second = Gateway(data_dirs[1], "--ray-address", joined.group(1), "--preload", MODELS[1], *flags,
                         env=S3_ENVIRONMENT)
    except BaseException:
        first.stop()
        raise
    yield Cluster((first, second), joined.group(1))
    second.stop()
    first.stop()   # the gateway that started the cluster takes it down with it


def runs_by_model(board: list[dict]) -> dict[str, dict[str, int]]:
    """Model → replica name → jobs it ran."""
    found: dict[str, dict[str, int]] = {}
    for replica in board:
        for air, count in replica["runs"].items():
            found.setdefault(air, {})[replica["name"]] = count
    return found


async def model_search(gateway: Gateway, air: str) -> dict[str, Any]:
    wire = await Wire.open(gateway.url)
    try:
        [result] = await wire.run({"taskType": "modelSearch", "search": air})
    finally:
        await wire.close()
    return next(model for model in result["results"] if model["air"] == air)


# Before any task: gateway B's preload is all that has loaded MODELS[1].
async def test_a_model_the_joining_gateway_preloads_is_on_every_replica_before_it_answers(cluster: Cluster) -> None:
    first, second = cluster.gateways
    board = cluster.board()
    assert len(board) == 2, board
    # Each replica loaded it (after the default model, which --max-loaded-models 1 then moved off the device), and
    # B answered only once they had: it is ready, so it is there.
    for replica in board:
        assert MODELS[1] in replica["preloaded"] and not replica["preload_errors"], replica
        assert replica["loaded_models"].get(MODELS[1]) == "device", replica
    assert {replica["node_id"] for replica in board} == {board[0]["node_id"]} and board[0]["node_id"]
    # Either gateway's modelSearch says so, A's too, which never asked for it: loadedOn is the replicas' word.
    for gateway in (first, second):
        found = await model_search(gateway, MODELS[1])
        assert found["loaded"] and found["loadedOn"] == "device", found
    assert (await model_search(first, MODELS[0]))["loadedOn"] is None


# First task: the routing needs replicas that hold no multiplexed model yet (see the test).
async def test_tasks_for_two_models_go_to_the_replicas_holding_them(cluster: Cluster) -> None:
    first, second = cluster.gateways
    board = cluster.board()
    assert len(board) == 2, board
    # The first model goes to either replica; the second to the one holding no model (Serve's fallback for a model
    # nobody holds), once the first replica has said what it holds (it reports it as it takes the job).
    await run_on(first, inference(model=MODELS[0]))
    await asyncio.sleep(seconds(3))
    await run_on(second, inference(model=MODELS[1]))
    await asyncio.sleep(seconds(3))
    for gateway in (first, second, second, first):
        for air in MODELS:
            await run_on(gateway, inference(model=air))
    runs = runs_by_model(cluster.board())
    holders = {air: set(runs.get(air, {})) for air in MODELS}
    assert all(len(names) == 1 for names in holders.values()), runs
    assert holders[MODELS[0]] != holders[MODELS[1]], runs
    assert [sum(runs[air].values()) for air in MODELS] == [5, 5], runs


async def test_a_task_sent_to_either_gateway_is_answered(cluster: Cluster) -> None:
    for gateway in cluster.gateways:
        (item,) = await run_on(gateway, inference(seed=7))
        assert item["imageUUID"] and item["seed"] == 7
    # The same seed through either gateway: the same engine on the replicas, the same picture.
    pictures = [item["imageBase64Data"] for gateway in cluster.gateways
                for item in await run_on(gateway, inference(seed=11, outputType="base64Data"))]
    assert len(pictures) == 2 and pictures[0] == pictures[1]


@pytest.mark.parametrize("output", [{"outputFormat": "PNG"}, {"outputFormat": "WEBP", "outputQuality": 70}],
                         ids=["PNG", "WEBP"])
async def test_the_images_encoded_on_a_replica_are_the_files_a_local_server_answers(
        cluster: Cluster, start_server: Any, output: dict[str, Any]) -> None:
    # Encoded where it was made (test_replica_messages.py), stored by the gateway: byte for byte what
    # --engine local encodes and stores for the same task and seed.
    task = inference(seed=23, numberResults=2, outputType="base64Data", **output)

    async def files(url: str) -> dict[int, str]:
        wire = await Wire.open(url)
        try:
            items = await wire.run(dict(task, taskUUID=new_uuid()), count=2, timeout=seconds(180))
        finally:
            await wire.close()
        return {item["seed"]: item["imageBase64Data"] for item in items}

    from_cluster = await files(cluster.gateways[1].url)
    local = await start_server()
    assert sorted(from_cluster) == [23, 24] and from_cluster == await files(local.url)


def scrape(gateway: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = get(f"http://{urllib.parse.urlsplit(gateway.url).netloc}/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


async def test_metrics_show_each_replicas_figures_on_either_gateway(cluster: Cluster) -> None:
    await asyncio.sleep(seconds(3))   # the last task's end is on the board, and the gateways have read it
    board = cluster.board()
    for gateway in cluster.gateways:
        samples = await asyncio.to_thread(scrape, gateway)
        assert samples[("imagewire_replicas", ())] == 2
        for replica in board:
            labels = (("node", replica["node_id"]), ("replica", replica["name"]))
            assert samples[("imagewire_replica_queue_depth", labels)] == 0
            assert ("imagewire_replica_device_busy_ratio", labels) in samples
            on_device = {air for air, where in replica["loaded_models"].items() if where == "device"}
            assert on_device and on_device == {dict(labels)["air"] for (name, labels) in samples
                                               if name == "imagewire_replica_loaded_models"
                                               and dict(labels)["replica"] == replica["name"]}, samples
        # The models on some replica's device, as the unlabelled figure for the whole cluster.
        assert {dict(labels)["air"] for (name, labels) in samples if name == "imagewire_loaded_models"} == {
            air for replica in board for air, where in replica["loaded_models"].items() if where == "device"}


def ray_sockets(gateway_pids: set[int]) -> list[str]:
    """``ss -tanp`` lines of the gateways' processes and their descendants (Ray's GCS, raylet, workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    ours = set(gateway_pids)
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                grew = True
    output = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, timeout=seconds(30), check=True).stdout
    return [line for line in output.splitlines()
            if any(int(pid) in ours for pid in re.findall(r"pid=(\d+)", line))]


def is_loopback_endpoint(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
    return host.startswith("127.") or host == "::1"


@pytest.mark.skipif(subprocess.run(["which", "ss"], capture_output=True).returncode != 0, reason="needs ss")
async def test_ray_keeps_to_loopback(cluster: Cluster) -> None:
    await run_on(cluster.gateways[1], inference())
    lines = ray_sockets({gateway.process.pid for gateway in cluster.gateways})
    assert len(lines) > 10, lines   # GCS, raylet, workers, replicas: listening and connected
    # Listening: on a loopback address. Connected: both ends on loopback.
    outward = [line for line in lines
               if not all(is_loopback_endpoint(end) for end in line.split()[3:4 if line.startswith("LISTEN") else 5])]
    assert not outward, "\n".join(outward)


async def test_killing_a_replica_mid_job_still_answers_its_tasks(cluster: Cluster) -> None:
    first, second = cluster.gateways
    air = MODELS[0]
    slow = [inference(model=air, seed=seed, **SLOW) for seed in (1, 2)]
    # One task first, alone: its replica then holds the model, and the next ones for it go there (tasks for a
    # model nobody holds yet that arrive together may go to different replicas, see docs/cluster.md).
    await run_on(first, inference(model=air))
    await asyncio.sleep(seconds(3))
    wires = [await Wire.open(gateway.url) for gateway in (first, second)]
    try:
        for wire, task in zip(wires, slow, strict=True):
            await wire.send([task])

        def holder() -> dict | None:
            replicas = [replica for replica in cluster.board() if replica["jobs"]]
            holding = [replica for replica in replicas if all(task["taskUUID"] in replica["jobs"] for task in slow)]
            return holding[0] if holding else None

        # Both tasks are for that model, so both are on the replica holding it, in one call.
        replica = await eventually(holder, timeout=seconds(120))
        os.kill(replica["pid"], signal.SIGKILL)
        try:
            answers = [await wire.items_for(task["taskUUID"], 1, timeout=seconds(300))
                       for wire, task in zip(wires, slow, strict=True)]
        except TimeoutError:
            raise AssertionError("unanswered after the kill:\n" + first.log[-5000:] + second.log[-5000:]) from None
    finally:
        for wire in wires:
            await wire.close()
    for data, errors in answers:
        assert not errors, errors
        assert len(data) == 1 and data[0]["imageUUID"]
    log = first.log + second.log
    assert log.count("before any image; trying another replica") == 2, log[-4000:]


async def test_the_cluster_serves_on_after_a_replica_died(cluster: Cluster) -> None:
    # Serve starts a replacement; meanwhile the live replica takes the work.
    for gateway in cluster.gateways:
        assert await run_on(gateway, inference())

    async def two_replicas() -> bool:
        return len(await asyncio.to_thread(cluster.board)) == 2

    await eventually(two_replicas, timeout=seconds(180))


async def test_a_cancel_reaches_the_replica_running_the_task(cluster: Cluster) -> None:
    gateway, air = cluster.gateways[1], MODELS[1]
    await run_on(gateway, inference(model=air))   # its replica holds the model (see the test above)
    slow = inference(model=air, seed=3, **SLOWER)
    wire = await Wire.open(gateway.url)
    try:
        await wire.send([slow])

        def holder() -> dict | None:
            return next((replica for replica in cluster.board() if slow["taskUUID"] in replica["jobs"]), None)

        before = await eventually(holder, timeout=seconds(120))
        await wire.send([{"taskType": "cancelTask", "taskUUID": slow["taskUUID"]}])
        # The cancelTask answer carries the same taskUUID: wait for the imageInference task's own answer.
        while not (answers := [item for item in (await wire.receive()).get("errors", [])
                               if item.get("taskType") == "imageInference"]):
            pass
        assert answers[0]["code"] == "taskCancelled" and answers[0]["taskUUID"] == slow["taskUUID"]

        def let_go() -> dict | None:
            replica = next(replica for replica in cluster.board() if replica["name"] == before["name"])
            return replica if slow["taskUUID"] not in replica["jobs"] else None

        after = await eventually(let_go, timeout=seconds(60))
    finally:
        await wire.close()
    # The replica's call ended without an answer: cancelled there, not run to its end.
    assert after["runs"].get(air, 0) == before["runs"].get(air, 0)
    assert f"taskUUID={slow['taskUUID']}" in cluster.gateways[0].log   # the replica's own lines, via gateway A


# One service over both gateways: Redis holds sessions and task records, the bucket the images.

def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=seconds(30)) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def on_gateway(url: str, gateway: Gateway) -> str:
    """``url`` (an imageURL) as the other gateway serves it."""
    return re.sub(r"^http://[^/]+", "http://" + urllib.parse.urlsplit(gateway.url).netloc, url)


async def test_a_task_run_through_one_gateway_is_visible_through_get_response_on_the_other(
        cluster: Cluster) -> None:
    first, second = cluster.gateways
    task = inference(seed=21, deliveryMethod="async", outputType="URL")
    on_first, on_second = await Wire.open(first.url), await Wire.open(second.url)
    try:
        await on_first.send([task])
        # Acknowledged by A once it is recorded: from then on B knows it.
        acknowledged, errors = await on_first.items_for(task["taskUUID"], 1)
        assert acknowledged and not errors, errors

        async def finished() -> dict | None:
            answer = await on_second.run({"taskType": "getResponse", "taskUUID": task["taskUUID"]})
            done = [item for item in answer if item.get("status") == "success"]
            return done[0] if done else None

        item = await eventually(finished, timeout=seconds(180))
    finally:
        await on_first.close()
        await on_second.close()
    # Its image is in the bucket: both gateways serve the same bytes.
    served = [await asyncio.to_thread(get, on_gateway(item["imageURL"], gateway)) for gateway in cluster.gateways]
    assert served[0][0] == 200 and served[0] == served[1]


async def test_an_image_answered_by_its_url_is_stored_by_the_replica_that_made_it(
        cluster: Cluster, start_server: Any, s3_endpoint: str) -> None:
    # Only its record crosses to the gateway (test_replica_store.py); the item and the file are those of a server
    # that stores its images itself (--engine local), for the same task and seed.
    second = cluster.gateways[1]
    task = inference(seed=31, outputType="URL", ttl=600, includeCost=True)
    (item,) = await run_on(second, task)
    # B's own account of the task: it spent no time storing the image (a task answering base64Data, whose bytes
    # cross to the gateway, does).
    with_bytes = dict(task, taskUUID=new_uuid(), outputType="base64Data")
    await run_on(second, with_bytes)

    def stages(sent: dict[str, Any]) -> str:
        found = re.search(rf"taskUUID={sent['taskUUID']} taskType=imageInference outcome=success .*", second.log)
        return found.group(0) if found else ""

    assert "store_ms=" not in await eventually(lambda: stages(task), timeout=seconds(30))
    assert "store_ms=" in await eventually(lambda: stages(with_bytes), timeout=seconds(30))
    served = [await asyncio.to_thread(get, on_gateway(item["imageURL"], gateway)) for gateway in cluster.gateways]

    local = await start_server()
    wire = await Wire.open(local.url)
    try:
        (local_item,) = await wire.run(dict(task, taskUUID=new_uuid()), timeout=seconds(180))
    finally:
        await wire.close()
    from_local = await asyncio.to_thread(get, local_item["imageURL"])
    assert from_local[0] == 200 and served == [from_local, from_local]
    assert set(item) == set(local_item) and item["cost"] == local_item["cost"]
    assert item["imageURL"].endswith(f"/{item['imageUUID']}.png")
    # Kept for the task's ttl, and counted as its key's.
    with bucket_client(s3_endpoint).get_object(Bucket=BUCKET, Key=f"images/meta/{item['imageUUID']}.json")["Body"] \
            as body:
        metadata = json.loads(body.read())
    assert metadata["expires"] == pytest.approx(metadata["created"] + 600)
    assert metadata["size"] == len(from_local[1]) and metadata["owner"]


async def test_the_same_task_uuid_sent_to_both_gateways_runs_once(cluster: Cluster) -> None:
    task = inference(seed=22)
    wires = [await Wire.open(gateway.url) for gateway in cluster.gateways]
    try:
        for wire in wires:
            await wire.send([task])
        answers = [await wire.items_for(task["taskUUID"], 1, timeout=seconds(180)) for wire in wires]
    finally:
        for wire in wires:
            await wire.close()
    images = [data for data, _ in answers if data]
    conflicts = [errors[0]["code"] for _, errors in answers if errors]
    assert len(images) == 1 and conflicts == ["conflictTaskUUID"], answers


async def test_an_upload_through_one_gateway_is_a_seed_image_through_the_other(cluster: Cluster) -> None:
    first, second = cluster.gateways
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (30, 160, 220)).save(buffer, "PNG")
    upload_wire = await Wire.open(first.url)
    try:
        [upload] = await upload_wire.run({"taskType": "imageUpload",
                                          "image": base64.b64encode(buffer.getvalue()).decode()})
    finally:
        await upload_wire.close()
    edits = []
    for seed_image in (upload["imageUUID"], base64.b64encode(buffer.getvalue()).decode()):
        [edit] = await run_on(second, inference(seed=23, seedImage=seed_image, strength=0.5, outputType="base64Data"))
        edits.append(edit["imageBase64Data"])
    # From the UUID the other gateway stored, the same picture as from the same bytes sent inline.
    assert edits[0] == edits[1]
    for gateway in cluster.gateways:
        assert await asyncio.to_thread(get, on_gateway(upload["imageURL"], gateway)) == (200, buffer.getvalue())


async def test_a_session_started_on_one_gateway_resumes_on_the_other(cluster: Cluster) -> None:
    first, second = cluster.gateways
    task = inference(seed=24, numberResults=2)
    started = await Wire.open(first.url)
    await started.send([task])
    await started.close()   # gone before its results: they wait in the session, in Redis
    resumed = await Wire.open(second.url, session=started.session)
    try:
        assert resumed.session == started.session
        data, errors = await resumed.items_for(task["taskUUID"], 2, timeout=seconds(180))
    finally:
        await resumed.close()
    assert not errors and sorted(item["seed"] for item in data) == [24, 25]


def test_without_a_cluster_at_ray_address_the_start_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]   # free, and nothing listens there once closed
    result = subprocess.run(
        [sys.executable, "-m", "imagewire.server", "--engine", "ray", "--ray-address", f"127.0.0.1:{port}",
         "--data-dir", str(tmp_path), "--port", "0", "--api-key", API_KEY],
        capture_output=True, text=True, timeout=seconds(60), cwd=ROOT)
    assert result.returncode == 2
    # The line that says the server is starting, then the one that says why it does not.
    assert result.stderr.strip().splitlines()[1:] == [
        f"imagewire-server: error: --ray-address 127.0.0.1:{port}: no Ray cluster answers there (Connection refused); "
        "start one with `ray start --head` or leave --ray-address out to start one on this machine"]


def test_a_port_that_is_no_ray_cluster_fails_the_start_within_a_bound(tmp_path: Path) -> None:
    with socket.socket() as listener:   # accepts connections and never answers, as a wrong service might
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "imagewire.server", "--engine", "ray", "--ray-address", f"127.0.0.1:{port}",
             "--data-dir", str(tmp_path), "--port", "0", "--api-key", API_KEY],
            capture_output=True, text=True, timeout=seconds(120), cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"imagewire-server: error: --ray-address 127.0.0.1:{port}: no Ray cluster answered there within 30 s; "
        "is it the head's GCS port, and does this machine have the cluster's token (RAY_AUTH_TOKEN)?")


# A gateway whose start fails in a way nobody planned for: its deployment raises.
UNEXPECTED_FAILURE = """
import sys
from imagewire.server import cluster
from imagewire.server.__main__ import main

def deploy(self, serve, cluster_gpus):
    raise RuntimeError("a failure nobody planned for")

cluster.RayDevice._deploy = deploy
main(sys.argv[1:])
"""


def test_an_unexpected_failure_after_ray_started_ends_the_start_at_once_with_its_traceback(tmp_path: Path) -> None:
    # Left to the interpreter, the error went through Ray's hook for uncaught errors, which held the process a
    # minute waiting on the cluster that was stopping with it.
    process = subprocess.Popen(
        [sys.executable, "-c", UNEXPECTED_FAILURE, "--engine", "ray", "--data-dir", str(tmp_path), "--port", "0",
         "--api-key", API_KEY], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stderr is not None
    lines: list[str] = []
    for line in process.stderr:
        lines.append(line)
        if "Started Serve" in line:
            break
    else:
        raise AssertionError("".join(lines[-30:]))
    try:
        _, rest = process.communicate(timeout=seconds(40))   # the deployment fails at once; the minute is the hang
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("still running 40 s after Ray started:\n" + "".join(lines[-20:])) from None
    assert process.returncode == 1, rest[-3000:]
    assert "ERROR imagewire.server the server could not start" in rest
    assert "RuntimeError: a failure nobody planned for" in rest
