"""--engine and its flags, and how they become a Serve deployment; no Ray needed (tests/cluster runs one)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imagewire.server.cluster import ClusterOptions, is_loopback
from imagewire.server.config import parse_args
from tests.timing import seconds


def test_the_engine_is_local_by_default():
    config = parse_args([])
    assert (config.engine, config.ray_address, config.replicas, config.min_replicas, config.max_replicas) == (
        "local", None, 1, None, None)


def test_cluster_flags_and_their_environment(monkeypatch):
    config = parse_args(["--engine", "ray", "--ray-address", "10.0.0.5:6379", "--replicas", "3"])
    assert (config.engine, config.ray_address, config.replicas) == ("ray", "10.0.0.5:6379", 3)
    monkeypatch.setenv("IMAGEWIRE_ENGINE", "ray")
    monkeypatch.setenv("IMAGEWIRE_RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("IMAGEWIRE_MIN_REPLICAS", "0")
    monkeypatch.setenv("IMAGEWIRE_MAX_REPLICAS", "4")
    config = parse_args([])
    assert (config.engine, config.ray_address, config.min_replicas, config.max_replicas) == (
        "ray", "127.0.0.1:6379", 0, 4)


@pytest.mark.parametrize(("argv", "message"), [
    (["--engine", "gpu"], "argument --engine: invalid choice: 'gpu'"),
    (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --engine ray"),
    (["--engine", "ray", "--ray-address", "head"], "expected HOST:PORT (the Ray head's GCS address), got 'head'"),
    (["--engine", "ray", "--replicas", "0"], "argument --replicas: must be at least 1, got 0"),
    (["--engine", "ray", "--max-replicas", "4"], "--min-replicas and --max-replicas go together"),
    (["--engine", "ray", "--min-replicas", "3", "--max-replicas", "2"],
     "--min-replicas 3 is more than --max-replicas 2"),
])
def test_bad_cluster_flags_stop_the_start_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_replicas_are_fixed_or_autoscaled_on_cpu_or_one_gpu_each():
    fixed = ClusterOptions.of(parse_args(["--engine", "ray", "--replicas", "2", "--device", "cpu"]), cluster_gpus=8)
    assert (fixed.num_replicas, fixed.autoscaling, fixed.actor_options, fixed.device) == (
        2, None, {"num_cpus": 1}, "cpu")
    # auto: GPUs where the cluster has them; a replica sees its own GPU as "cuda".
    assert ClusterOptions.of(parse_args(["--engine", "ray"]), cluster_gpus=2).actor_options == {"num_gpus": 1}
    assert ClusterOptions.of(parse_args(["--engine", "ray", "--device", "cuda:1"]), cluster_gpus=2).device == "cuda"
    assert ClusterOptions.of(parse_args(["--engine", "ray"]), cluster_gpus=0).device == "cpu"
    scaled = ClusterOptions.of(parse_args(["--engine", "ray", "--min-replicas", "0", "--max-replicas", "4",
                                           "--max-batch-size", "2"]), cluster_gpus=0)
    assert scaled.num_replicas is None
    assert scaled.autoscaling == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                  "target_ongoing_requests": 2}


def test_loopback_addresses_are_recognised():
    assert is_loopback(None) and is_loopback("127.0.0.1:6379") and is_loopback("localhost:1")
    assert is_loopback("[::1]:6379")
    assert not is_loopback("10.0.0.5:6379") and not is_loopback("head:6379")


def test_the_default_engine_imports_no_ray():
    code = ("import sys; from imagewire.server.config import parse_args; import imagewire.server.app, "
            "imagewire.server.cluster; parse_args(['--engine', 'ray']); print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds(60),
                            check=True)
    assert result.stdout.strip() == "False"
