"""Flags and their IMAGEWIRE_* fallbacks: values reach the Config, bad ones stop the start with a message."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest

from imagewire import tasks
from imagewire.server.admission import Admission, DeviceTime
from imagewire.server.auth import load_or_create_key, new_api_key
from imagewire.server.config import GROUPS, OPTIONS, Config, build_parser, parse_args, shown_default, shown_url
from imagewire.tasks.context import PixelBudget, TaskContext
from imagewire.tasks.errors import TaskError


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
    (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4' (choose from 'none', 'int8', 'float8')"),
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
    assert "argument --max-batch-size: must be at least 1, got 0 (from IMAGEWIRE_MAX_BATCH_SIZE)" in parse_error(
        [], capsys)


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


# One definition: each setting's default is written once (on its Config field); flags, environment and
# config file only read it.

def test_the_flags_default_to_configs_own_values_for_every_field():
    parsed, built = parse_args([]), Config()
    for each in fields(Config):
        assert getattr(parsed, each.name) == getattr(built, each.name), each.name
    # The bound the tests run under is the shipped one: 4096x4096, inputs and upscale results alike.
    assert parsed.max_image_pixels == parsed.max_output_pixels == 4096 * 4096


def test_the_default_help_shows_is_the_default_a_flag_of_that_value_gives():
    # A default shown in the flag's unit (MiB, megapixels, days, 0 for no bound) converts back to the field's.
    checked = 0
    for name, option in OPTIONS.items():
        shown = shown_default(name, option)
        if shown is None or option.shown_default is not None:
            continue
        assert getattr(parse_args([option.flag, shown]), name) == getattr(Config(), name), option.flag
        checked += 1
    assert checked > 30


def test_fake_is_an_engine_choice():
    assert parse_args(["--engine", "fake"]).engine == "fake"


def test_an_environment_value_of_the_wrong_kind_is_named_with_its_variable(monkeypatch, capsys):
    monkeypatch.setenv("IMAGEWIRE_TRUSTED_PROXIES", "10.0.0.0/8, proxy.internal")
    assert parse_error([], capsys).strip().splitlines() == [
        "imagewire-server: error: argument --trusted-proxy: expected an address or a CIDR such as 10.0.0.0/8, "
        "got 'proxy.internal' (from IMAGEWIRE_TRUSTED_PROXIES)"]


# --help

def option_blocks(help_text: str) -> dict[str, str]:
    """Each option's entry in --help, its wrapped lines joined, by flag."""
    blocks: dict[str, str] = {}
    flag = None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            flag = "--help" if flag == "-h" else flag
            blocks[flag] = line
        elif flag is not None and line.startswith("   "):
            blocks[flag] += " " + line.strip()
        else:
            flag = None
    return blocks


def test_help_shows_every_setting_in_one_named_group():
    parser = build_parser()
    titles = [group.title for group in parser._action_groups]
    assert set(GROUPS) <= set(titles)
    where: dict[str, list[str]] = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            for flag in action.option_strings:
                where.setdefault(flag, []).append(group.title or "")
    for option in OPTIONS.values():
        assert where[option.flag] == [option.group], option.flag
    # Outside the named groups: only what is about the program, not a setting.
    ungrouped = {flag for flag, titles in where.items() if titles[0] not in GROUPS}
    assert ungrouped == {"-h", "--help", "--version", "--config"}
    text = parser.format_help()
    for title in GROUPS:
        assert f"\n{title}:\n" in text
    blocks = option_blocks(text)
    assert set(blocks) == {option.flag for option in OPTIONS.values()} | {"--help", "--version", "--config"}
    assert "least severe log records" in blocks["--log-level"]


def test_no_help_entry_states_a_default_twice():
    blocks = option_blocks(build_parser().format_help())
    for block in blocks.values():
        # "the default model" and --default-model are a model, not this option's default.
        assert len(re.findall(r"(?<![-\w])default\b(?! model)", block)) <= 1, block
    assert blocks["--public-url"].endswith("(default: http://HOST:PORT)")
    assert blocks["--max-image-megapixels"].endswith("(default: 16.777216)")


def error_codes() -> set[str]:
    found, waiting = set(), [TaskError]
    while waiting:
        kind = waiting.pop()
        found.add(kind.code)
        waiting.extend(kind.__subclasses__())
    return found


# How a help text names the error code a client gets past its bound.
NAMED_CODE = re.compile(r"(?:answers?|refused with) ([a-z]+[A-Z]\w*)")


def named_code(flag: str) -> str:
    (code,) = NAMED_CODE.findall(option_blocks(build_parser().format_help())[flag])
    return code


def test_error_codes_named_in_help_are_real_codes_and_the_ones_the_code_raises():
    codes = error_codes()
    wire_names = "".join(path.read_text() for path in Path(tasks.__file__).parent.glob("*.py"))
    for flag, block in option_blocks(build_parser().format_help()).items():
        for word in NAMED_CODE.findall(block):
            assert word in codes, f"{flag} names {word}, which is no error code"
        # Any other camelCase word is a name the wire uses (a task type, a parameter).
        for word in re.findall(r"\b[a-z]+(?:[A-Z][a-z0-9]*)+\b", block):
            assert word in codes or f'"{word}"' in wire_names or f"{word}:" in wire_names, f"{flag}: {word}"

    device_time = DeviceTime(10.0, clock=lambda: 0.0)
    device_time.use("key", 20.0)
    refused = device_time.refuse("key")
    assert refused is not None and refused.code == named_code("--device-seconds-per-key-hour")

    per_connection = Admission(per_connection=1, per_key=10)
    per_connection.acquire("socket", "key")
    with pytest.raises(TaskError) as stopped:
        per_connection.acquire("socket", "other key")
    assert stopped.value.code == named_code("--max-tasks-in-flight")

    per_key = Admission(per_connection=10, per_key=1)
    per_key.acquire("socket", "key")
    with pytest.raises(TaskError) as stopped:
        per_key.acquire("other socket", "key")
    assert stopped.value.code == named_code("--max-tasks-per-key")

    waiting = TaskContext(SimpleNamespace(pixels=PixelBudget(100)), "owner")  # type: ignore[arg-type]
    waiting.hold_pixels(100, parameter="seedImage")
    with pytest.raises(TaskError) as stopped:
        waiting.hold_pixels(1, parameter="maskImage")
    assert stopped.value.code == named_code("--max-waiting-megapixels")


# --config FILE

@pytest.fixture
def config_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "imagewire.toml"
        path.write_text(text)
        return str(path)
    return write


def test_a_config_file_sets_what_its_flags_would(config_file):
    path = config_file("""
port = 9000
data-dir = "/srv/imagewire"
api-key = ["first", "second"]
allow-downloads = true
max-image-megapixels = 1
min-free-disk-gib = 0.25
max-storage-gib = 0
trusted-proxy = ["10.1.2.3/8"]
engine = "ray"
ray-address = "10.0.0.5:6379"
log-level = "DEBUG"
""")
    config = parse_args(["--config", path])
    assert (config.port, config.data_dir, config.api_keys) == (9000, Path("/srv/imagewire"), ("first", "second"))
    assert config.allow_downloads is True
    assert (config.max_image_pixels, config.min_free_disk_bytes, config.max_storage_bytes) == (
        1_000_000, 256 * 1024 * 1024, None)
    assert config.trusted_proxies == ("10.0.0.0/8",)
    assert (config.engine, config.ray_address, config.log_level) == ("ray", "10.0.0.5:6379", "DEBUG")


def test_flags_win_over_the_environment_which_wins_over_the_file_which_wins_over_the_defaults(
        config_file, monkeypatch):
    path = config_file("queue-size = 5\nallow-private-urls = true\n")
    assert parse_args([]).queue_size == 256
    assert parse_args(["--config", path]).queue_size == 5
    monkeypatch.setenv("IMAGEWIRE_QUEUE_SIZE", "6")
    assert parse_args(["--config", path]).queue_size == 6
    assert parse_args(["--config", path, "--queue-size", "7"]).queue_size == 7
    # A switch the file turns on, the environment may turn off.
    assert parse_args(["--config", path]).allow_private_urls is True
    monkeypatch.setenv("IMAGEWIRE_ALLOW_PRIVATE_URLS", "false")
    assert parse_args(["--config", path]).allow_private_urls is False


def test_the_config_file_may_be_named_in_the_environment_and_the_flag_wins(config_file, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEWIRE_CONFIG", config_file("port = 9001\n"))
    assert parse_args([]).port == 9001
    other = tmp_path / "other.toml"
    other.write_text("port = 9002\n")
    assert parse_args(["--config", str(other)]).port == 9002


def one_line_error(argv, capsys) -> str:
    (line,) = parse_error(argv, capsys).strip().splitlines()
    return line


@pytest.mark.parametrize(("text", "expected"), [
    ('port = "abc"', 'key "port" must be a whole number from 0 to 65535, got "abc"'),
    ("port = 70000", 'key "port" must be a whole number from 0 to 65535, got 70000'),
    ("port = 8080.0", 'key "port" must be a whole number from 0 to 65535, got 8080.0'),
    ("max-batch-size = true", 'key "max-batch-size" must be a whole number, at least 1, got true'),
    ("auth-timeout = 0", 'key "auth-timeout" must be a number greater than 0, got 0'),
    ('allow-downloads = "yes"', 'key "allow-downloads" must be true or false, got "yes"'),
    ('api-key = "k"', 'key "api-key" must be a list, each a string, got "k"'),
    ('engine = "gpu"', 'key "engine" must be one of local, ray, fake, got "gpu"'),
    ('store = "/srv/images"', "key \"store\": expected s3://BUCKET/PREFIX, got '/srv/images'"),
])
def test_a_value_of_the_wrong_kind_in_the_file_stops_the_start_with_one_line(text, expected, config_file, capsys):
    path = config_file(text + "\n")
    assert one_line_error(["--config", path], capsys) == f"imagewire-server: error: --config {path}: {expected}"


@pytest.mark.parametrize("key", ["prot", "config"])
def test_an_unknown_key_stops_the_start_naming_it_the_file_and_the_known_keys(key, config_file, capsys):
    path = config_file(f'{key} = "x"\n')
    line = one_line_error(["--config", path], capsys)
    assert line.startswith(f'imagewire-server: error: --config {path}: unknown key "{key}"')
    known = line.split("; known keys: ")[1].split(", ")
    assert known == [option.key for option in OPTIONS.values()] and "config" not in known
    if key == "prot":
        assert '(did you mean "port"?)' in line


def test_a_missing_or_malformed_file_stops_the_start_with_one_line(config_file, tmp_path, capsys):
    missing = tmp_path / "absent.toml"
    assert one_line_error(["--config", str(missing)], capsys) == (
        f"imagewire-server: error: --config {missing}: cannot read it: No such file or directory")
    path = config_file("port = \n")
    assert one_line_error(["--config", path], capsys).startswith(
        f"imagewire-server: error: --config {path}: not valid TOML: ")
    latin = tmp_path / "latin-1.toml"
    latin.write_bytes('default-model = "café"\n'.encode("latin-1"))
    assert one_line_error(["--config", str(latin)], capsys).startswith(
        f"imagewire-server: error: --config {latin}: not valid TOML: ")


def test_the_engine_settings_are_checked_together_whatever_their_source(config_file, capsys):
    path = config_file('ray-address = "10.0.0.5:6379"\n')
    assert one_line_error(["--config", path], capsys) == "imagewire-server: error: --ray-address needs --engine ray"
    assert parse_args(["--config", path, "--engine", "ray"]).ray_address == "10.0.0.5:6379"


def test_version_prints_the_installed_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--version"])
    assert stopped.value.code == 0
    with open(Path(__file__).parents[2] / "pyproject.toml", "rb") as project:
        expected = tomllib.load(project)["project"]["version"]
    assert capsys.readouterr().out == f"imagewire-server {expected}\n"
