"""Shared fixtures: one tiny model per test session, and real servers on free ports."""

from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from imagewire.server.app import ImagewireServer
from imagewire.server.config import Config
from tests.engines import data_dir_with_models
from tests.fake_hub import HUB_MODEL, REPO, FakeHub, point_hub_at
from tests.redis_process import RedisProcess
from tests.timing import seconds
from tests.wire import API_KEY

# Tests never reach a model hub, and never wait for one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One seed gives the same pixels only on the same torch thread count: a CPU sum taken in another order differs
# in its last bits, now and then by one level of an 8-bit image. The server's CPU policy changes the count with
# the machine's load, so the tests that compare two calls' images for equality would fail whenever something
# else on the machine got busy mid-run. They run on torch's own default, held fixed as an operator holds it
# (README); the policy's own tests (tests/server/test_engine.py) unset this. Child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

# No test traffic leaves this machine: this process connects to loopback only and looks up no name
# but localhost (tests/network_guard). Child processes that tests start inherit the guard.
GUARD = Path(__file__).with_name("network_guard")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GUARD), os.environ.get("PYTHONPATH")]))
runpy.run_path(str(GUARD / "sitecustomize.py"))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with every embedded model (the tiny model, its LoRA, embedding and VAE, the tiny
    SDXL pair) built once for the whole session, where a data dir's ``models`` folder keeps them."""
    from imagewire.air_registry import Catalog
    from imagewire.air_registry.tiny import ensure_embedded
    from imagewire.air_registry.weights import local_model_dir

    root = tmp_path_factory.mktemp("shared-models")
    ensure_embedded("tiny-sd", root / "imagewire-tiny-1")
    for entry in Catalog.load().entries:
        if entry.source == "embedded":
            ensure_embedded(entry.location, root / local_model_dir(entry, Path(".")).name)
    return root


@pytest.fixture
def data_dir(tmp_path: Path, models_dir: Path) -> Path:
    """A fresh data dir that shares the session's tiny model."""
    return data_dir_with_models(tmp_path / "data", models_dir)


@pytest.fixture
def own_data_dir(tmp_path: Path, models_dir: Path) -> Path:
    """A data dir with a models folder of its own, so that what a test downloads or uploads stays out of the
    session's shared one; the tiny models already built are linked in one by one."""
    from imagewire.air_registry.tiny import ensure_embedded

    ensure_embedded("tiny-sd", models_dir / "configs" / "tiny-sd")
    models = tmp_path / "own-data" / "models"
    models.mkdir(parents=True)
    for built in models_dir.iterdir():
        (models / built.name).symlink_to(built, target_is_directory=True)
    return tmp_path / "own-data"


@pytest.fixture(scope="module")
def module_data_dir(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, request: pytest.FixtureRequest) -> Path:
    """A data dir for one test module that shares the session's tiny model: for a module-scoped engine, which keeps
    its models loaded from test to test."""
    return data_dir_with_models(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]), models_dir)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A data dir for the whole session holding the tiny model where the catalog expects it (the session's one
    build): for the tests that only read it."""
    return data_dir_with_models(tmp_path_factory.mktemp("session-data"), models_dir)


ServerFactory = Callable[..., Any]


@pytest_asyncio.fixture
async def start_server(data_dir: Path) -> AsyncIterator[ServerFactory]:
    """Start servers with chosen settings; each is stopped at the end of the test."""
    started: list[ImagewireServer] = []

    async def start(**overrides: Any) -> ImagewireServer:
        engine_factory = overrides.pop("engine_factory", None)
        settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "data_dir": data_dir, "api_keys": (API_KEY,)}
        settings.update(overrides)
        server = ImagewireServer(Config(**settings), engine_factory=engine_factory)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(grace=seconds(5))


@pytest_asyncio.fixture
async def server(start_server: ServerFactory) -> ImagewireServer:
    """A server on the tiny model with default settings (URL inputs may reach loopback)."""
    return await start_server(allow_private_urls=True)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, and no network: hub models are then certainly missing."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import; the module values are what it uses.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The tiny SD model as one safetensors checkpoint in the original layout, as Civitai serves them."""
    from tests.checkpoints import write_tiny_sd_checkpoint

    return write_tiny_sd_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors").read_bytes()


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-size SD 1.5 checkpoint in the original layout (float16, random weights, ~2 GB), written once."""
    from tests.checkpoints import write_sd15_checkpoint

    return write_sd15_checkpoint(tmp_path_factory.mktemp("sd15") / "my-sd15-model.safetensors")


@pytest.fixture(scope="session")
def s3_endpoint() -> Any:
    """An S3-compatible endpoint for the whole session: moto's server, in this process, on loopback."""
    pytest.importorskip("boto3", reason="the S3 store's tests need boto3: pip install -e '.[s3]'")
    threaded = pytest.importorskip("moto.moto_server.threaded_moto_server",
                                   reason="the S3 store's tests need moto's server: pip install 'moto[server]'")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    moto = threaded.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    yield f"http://{host}:{port}"
    moto.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A new empty bucket at ``s3_endpoint``, and dummy AWS credentials for this test only."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Nothing probes the instance metadata address, and no one's ~/.aws is read.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"imagewire-{os.urandom(6).hex()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def redis_executable() -> str:
    """redis-server's path; the test is skipped without it or without redis-py, unless IMAGEWIRE_REQUIRE_REDIS=1
    (CI) makes that a failure."""
    required = os.environ.get("IMAGEWIRE_REQUIRE_REDIS") == "1"
    executable = shutil.which("redis-server")
    if executable is None:
        if required:
            pytest.fail("IMAGEWIRE_REQUIRE_REDIS=1 but redis-server is not installed (apt-get install redis-server)")
        pytest.skip("the shared-state tests need redis-server (apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        if required:
            pytest.fail("IMAGEWIRE_REQUIRE_REDIS=1 but redis-py is not installed (pip install -e '.[redis]')")
        pytest.skip("the shared-state tests need redis-py: pip install -e '.[redis]'")
    return executable


@pytest.fixture(scope="session")
def redis_server(redis_executable: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A redis-server of our own for the whole session (tests/redis_process.py)."""
    server = RedisProcess(redis_executable, tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


@pytest_asyncio.fixture
async def hub(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeHub]:
    """The tiny model's folder served as a hub repo, slowly enough (a few seconds) that progress shows: the hub
    library writes each of its files whole, so the bytes on disk grow a file at a time, and its files must end
    well apart for reports to fall between them."""
    hub = await FakeHub({REPO: models_dir / "imagewire-tiny-1"}, chunk=32 * 1024, pause=0.03).start()
    point_hub_at(hub, tmp_path / "hf-cache", monkeypatch)
    yield hub
    await hub.stop()


@pytest.fixture
def hub_catalog(tmp_path: Path) -> Path:
    """A catalog file naming the hub repo as a checkpoint of the tiny model's architecture."""
    path = tmp_path / "hub-catalog.json"
    path.write_text(json.dumps([{
        "air": HUB_MODEL, "name": "tiny, from the hub", "architecture": "tiny", "category": "checkpoint",
        "source": "hub", "location": REPO,
        "defaults": {"width": 256, "height": 256, "steps": 8, "scheduler": "Default", "CFGScale": 7, "strength": 0.8},
    }]))
    return path
