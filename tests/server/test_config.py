"""Flags and their IMAGEWIRE_* fallbacks: values reach the Config, bad ones stop the start with a message."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagewire.server.auth import load_or_create_key, new_api_key
from imagewire.server.config import parse_args, shown_url


@pytest.fixture(autouse=True)
def no_imagewire_environment(monkeypatch):
    import os
    for name in list(os.environ):
        if name.startswith("IMAGEWIRE_"):
            monkeypatch.delenv(name)


def parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_flags_reach_the_config():
    config = parse_args(["--port", "0", "--queue-size", "3", "--max-batch-size", "1", "--auth-timeout", "2.5",
                         "--max-image-mib", "5", "--api-key", "a", "--api-key", "b", "--resume-window", "0"])
    assert (config.port, config.queue_size, config.max_batch_size, config.auth_timeout) == (0, 3, 1, 2.5)
    assert config.max_image_bytes == 5 * 1024 * 1024
    assert config.api_keys == ("a", "b")
    assert config.resume_window == 0


def test_environment_fills_in_what_flags_leave_out_and_flags_win(monkeypatch):
    monkeypatch.setenv("IMAGEWIRE_QUEUE_SIZE", "7")
    monkeypatch.setenv("IMAGEWIRE_MAX_BATCH_SIZE", "2")
    monkeypatch.setenv("IMAGEWIRE_API_KEYS", "one, two")
    monkeypatch.setenv("IMAGEWIRE_DATA_DIR", "/srv/imagewire")
    monkeypatch.setenv("IMAGEWIRE_PORT", "")  # set but empty: the default
    config = parse_args(["--max-batch-size", "3"])
    assert (config.queue_size, config.max_batch_size, config.port) == (7, 3, 8080)
    assert config.api_keys == ("one", "two")
    assert config.data_dir == Path("/srv/imagewire")


@pytest.mark.parametrize(("argv", "expected"), [
    (["--max-batch-size", "0"], "argument --max-batch-size: must be at least 1, got 0"),
    (["--queue-size", "-5"], "argument --queue-size: must be at least 1, got -5"),
    (["--max-tasks-in-flight", "many"], "argument --max-tasks-in-flight: expected a whole number, got 'many'"),
    (["--port", "70000"], "argument --port: must be 0 to 65535, got 70000"),
    (["--auth-timeout", "0"], "argument --auth-timeout: must be greater than 0, got 0"),
    (["--image-ttl-days", "nan"], "argument --image-ttl-days: must be greater than 0, got nan"),
    (["--shutdown-grace", "-1"], "argument --shutdown-grace: must be at least 0, got -1"),
    (["--civitai-url", "civitai.com"],
     "argument --civitai-url: expected an http:// or https:// URL, got 'civitai.com'"),
])
def test_bad_values_stop_the_start_naming_the_flag_the_allowed_range_and_the_value(argv, expected, capsys):
    assert expected in parse_error(argv, capsys)


def test_model_download_settings_have_flags_and_environment_fallbacks(monkeypatch):
    default = parse_args([])
    assert (default.default_model, default.civitai_url, default.civitai_token, default.allow_downloads) == (
        "imagewire:tiny@1", "https://civitai.com", None, False)
    monkeypatch.setenv("IMAGEWIRE_CIVITAI_TOKEN", "t0ken")
    monkeypatch.setenv("IMAGEWIRE_DEFAULT_MODEL", "sd-turbo")
    config = parse_args(["--civitai-url", "http://127.0.0.1:9000/", "--allow-downloads"])
    assert (config.default_model, config.civitai_url, config.civitai_token, config.allow_downloads) == (
        "sd-turbo", "http://127.0.0.1:9000", "t0ken", True)


def test_the_image_store_is_local_by_default_and_an_s3_bucket_by_flag_or_environment(monkeypatch, capsys):
    assert (parse_args([]).store, parse_args([]).s3_endpoint) == (None, None)
    config = parse_args(["--store", "s3://team-images/imagewire/", "--s3-endpoint", "http://127.0.0.1:9000/"])
    assert (config.store, config.s3_endpoint) == ("s3://team-images/imagewire", "http://127.0.0.1:9000")
    monkeypatch.setenv("IMAGEWIRE_STORE", "s3://other-bucket")
    monkeypatch.setenv("IMAGEWIRE_S3_ENDPOINT", "https://s3.example.test")
    assert (parse_args([]).store, parse_args([]).s3_endpoint) == ("s3://other-bucket", "https://s3.example.test")
    assert "argument --store: expected s3://BUCKET/PREFIX, got '/srv/images'" in parse_error(
        ["--store", "/srv/images"], capsys)
    assert "is not an S3 bucket name" in parse_error(["--store", "s3://Team_Images"], capsys)


def test_a_bad_environment_value_is_reported_like_a_bad_flag(monkeypatch, capsys):
    monkeypatch.setenv("IMAGEWIRE_MAX_BATCH_SIZE", "0")
    assert "argument --max-batch-size: must be at least 1, got 0" in parse_error([], capsys)


def test_generated_keys_can_be_passed_back_on_the_command_line(tmp_path):
    # A key starting with "-" would read as a flag: "--api-key -x" does not parse.
    keys = {new_api_key() for _ in range(500)}
    assert len(keys) == 500
    for key in keys:
        assert parse_args(["--api-key", key]).api_keys == (key,)
    key, created = load_or_create_key(tmp_path)
    assert created and parse_args(["--api-key", key]).api_keys == (key,)
    assert load_or_create_key(tmp_path) == (key, False)


def test_model_memory_flags_and_their_environment(monkeypatch):
    config = parse_args(["--max-loaded-models", "2", "--ram-models", "3", "--preload", "tiny-sdxl",
                         "--preload", "imagewire:sd15@1", "--max-passed-over", "0"])
    assert (config.max_loaded_models, config.ram_models, config.max_passed_over) == (2, 3, 0)
    assert config.preload == ("tiny-sdxl", "imagewire:sd15@1")
    defaults = parse_args([])
    memory = (defaults.max_loaded_models, defaults.ram_models, defaults.preload, defaults.max_passed_over)
    assert memory == (1, 0, (), 4)
    monkeypatch.setenv("IMAGEWIRE_PRELOAD", "a:b@1, c:d@2")
    monkeypatch.setenv("IMAGEWIRE_RAM_MODELS", "1")
    config = parse_args([])
    assert config.preload == ("a:b@1", "c:d@2") and config.ram_models == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-loaded-models", "0"], "argument --max-loaded-models: must be at least 1, got 0"),
    (["--ram-models", "-1"], "argument --ram-models: must be at least 0, got -1"),
    (["--max-passed-over", "x"], "argument --max-passed-over: expected a whole number, got 'x'"),
])
def test_bad_model_memory_values_stop_the_start(argv, message, capsys):
    assert message in parse_error(argv, capsys)


def test_shared_state_is_in_memory_by_default_and_in_redis_by_flag_or_environment(monkeypatch, capsys):
    assert parse_args([]).state is None
    assert parse_args(["--state", "redis://10.0.0.7:6379/2"]).state == "redis://10.0.0.7:6379/2"
    assert parse_args(["--state", "rediss://:pw@redis.internal:6380"]).state == "rediss://:pw@redis.internal:6380"
    monkeypatch.setenv("IMAGEWIRE_STATE", "redis://127.0.0.1:6379/0")
    assert parse_args([]).state == "redis://127.0.0.1:6379/0"
    for wrong in ("127.0.0.1:6379", "redis://127.0.0.1:6379/zero", "http://127.0.0.1:6379"):
        assert (f"argument --state: expected redis://HOST:PORT/DB (or rediss:// for TLS), got '{wrong}'"
                in parse_error(["--state", wrong], capsys))
    assert shown_url("redis://:hunter2@10.0.0.7:6379/0") == "redis://:***@10.0.0.7:6379/0"
    assert shown_url("rediss://user:hunter2@10.0.0.7/0") == "rediss://user:***@10.0.0.7/0"
