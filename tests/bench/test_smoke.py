"""The benchmark harness end to end on a tiny budget: every section runs and reports numbers.

Nothing here asserts on a timing: on a shared 2-core CI box any figure can move. Only the shape
of the results is checked, so a change that breaks the harness fails here, not at release time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.cli import main
from bench.gpu_models import build_pipeline, load_config, shrink
from bench.server_process import parse_task_line
from bench.stats import percentile, summarize


def _numbers(summary: dict[str, Any]) -> bool:
    return summary["n"] > 0 and all(isinstance(summary[key], float | int) for key in ("p50", "p99", "mean"))


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-out")
    return main(["--suite", "cpu", "--quick", "--out", str(out)])


def test_quick_cpu_run_fills_every_section(cpu_results: dict[str, Any]) -> None:
    latency = cpu_results["latency"][0]
    assert _numbers(latency["raw_ms"]) and _numbers(latency["served_ms"])
    assert latency["served_over_raw"]["p50"] is not None
    stages = latency["stages"]
    assert stages["tasks"] > 0
    assert {"decode", "queue", "model", "encode", "store", "send"} <= set(stages["stages_ms"])
    assert _numbers(stages["stages_ms"]["model"])

    concurrency = cpu_results["concurrency"][0]
    assert [level["connections"] for level in concurrency["levels"]] == [1, 4, 16]
    assert all(level["images_per_s"] > 0 and level["relative_to_raw"] for level in concurrency["levels"])
    # Tasks that wait together share pipeline calls; the raw loop is also measured that way.
    assert all(1 <= level["images_per_call"] <= 4 for level in concurrency["levels"])
    assert concurrency["raw_batched"]["images_per_call"] == 4 and concurrency["raw_batched"]["images_per_s"] > 0
    assert _numbers(concurrency["ping_under_load"]["rtt_ms"])
    assert _numbers(cpu_results["idle_ping_ms"])

    assert {(row["format"], row["size"]) for row in cpu_results["uploads"]} == {("PNG", 256), ("JPEG", 256)}
    assert all(row["mb_per_s"] > 0 for row in cpu_results["uploads"])
    assert {row["encoding"] for row in cpu_results["encoding"]} == {"JPG q95", "PNG", "WEBP q95"}
    assert all(_numbers(row["encode_ms"]) and _numbers(row["base64_ms"]) for row in cpu_results["encoding"])

    memory = cpu_results["memory"]
    assert memory["tasks"] == 20 and memory["rss_after_load_mib"] > 0
    assert [sample["tasks"] for sample in memory["samples"]] == [0, 10, 20]

    checked = {check["check"].split(",")[0] for check in cpu_results["checks"]}
    assert {"served/raw p50", "throughput vs raw", "ping p99 under load (16 connections)"} <= checked


def test_quick_cpu_run_writes_json_with_its_environment(cpu_results: dict[str, Any]) -> None:
    written = json.loads(Path(cpu_results["files"]["json"]).read_text(encoding="utf-8"))
    environment = written["environment"]
    assert environment["command"].startswith("python -m bench --suite cpu --quick")
    assert environment["cpu_model"] and environment["cpu_cores"] >= 1 and environment["date"]
    assert environment["versions"]["torch"] and environment["versions"]["diffusers"] and environment["python"]
    assert "### Targets" in Path(cpu_results["files"]["markdown"]).read_text(encoding="utf-8")


def test_gpu_suite_dry_run_serves_flux_and_sd35_shapes_through_a_catalog(tmp_path: Path) -> None:
    results = main(["--suite", "gpu", "--dry-run", "--sections", "latency", "--models", "flux,sd35",
                    "--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out")])
    assert [row["workload"] for row in results["latency"]] == [
        "flux txt2img 128² 2 steps", "flux img2img 128² 2 steps", "sd35 txt2img 128² 2 steps",
        "sd35 img2img 128² 2 steps"]
    assert all(_numbers(row["served_ms"]) and _numbers(row["raw_ms"]) for row in results["latency"])
    index = json.loads((tmp_path / "models" / "flux-random-small" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"


def test_gpu_suite_dry_run_serves_both_architectures_through_a_catalog(tmp_path: Path) -> None:
    results = main(["--suite", "gpu", "--dry-run", "--sections", "latency", "--models-dir", str(tmp_path / "models"),
                    "--out", str(tmp_path / "out")])
    names = [row["workload"] for row in results["latency"]]
    assert names == ["sd15 txt2img 128² 2 steps", "sd15 img2img 128² 2 steps",
                     "sdxl txt2img 128² 2 steps", "sdxl img2img 128² 2 steps"]
    assert all(_numbers(row["served_ms"]) and row["stages"]["tasks"] > 0 for row in results["latency"])
    assert (tmp_path / "models" / "sd15-random-small" / "model_index.json").is_file()
    assert (tmp_path / "models" / "sdxl-random-small" / "model_index.json").is_file()


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_full_configs_keep_their_published_shapes(architecture: str) -> None:
    config = load_config(architecture)
    unet = config["unet"]
    encoders = [config[key] for key in ("text_encoder", "text_encoder_2") if key in config]
    assert unet["cross_attention_dim"] == sum(encoder["hidden_size"] for encoder in encoders)
    small = shrink(config)
    assert small["unet"]["down_block_types"] == unet["down_block_types"]
    assert len(small["vae"]["block_out_channels"]) == len(config["vae"]["block_out_channels"])


def test_shrunk_sd15_builds_with_real_block_layout() -> None:
    import torch

    pipe = build_pipeline(shrink(load_config("sd15")), device="cpu", dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer("a lighthouse").input_ids[-1] < pipe.text_encoder.config.vocab_size


def test_flow_configs_keep_their_published_shapes() -> None:
    flux, sd35 = load_config("flux")["transformer"], load_config("sd35")
    # FLUX.1 [dev]: 19 double- and 38 single-stream blocks of width 3072, reading T5 XXL and CLIP L's pool.
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"] * flux["attention_head_dim"]) \
        == (19, 38, 3072)
    assert flux["joint_attention_dim"] == load_config("flux")["text_encoder_2"]["d_model"] == 4096
    assert flux["guidance_embeds"] and sum(flux["axes_dims_rope"]) == flux["attention_head_dim"]
    # SD 3.5 large: 38 MMDiT blocks of width 2432, both CLIPs' pools, T5 XXL.
    transformer = sd35["transformer"]
    assert transformer["num_layers"] == 38 and transformer["caption_projection_dim"] == 38 * 64
    assert transformer["pooled_projection_dim"] == sd35["text_encoder"]["projection_dim"] + sd35["text_encoder_2"][
        "projection_dim"]
    assert transformer["joint_attention_dim"] == sd35["text_encoder_3"]["d_model"]


@pytest.mark.parametrize(("architecture", "model_class", "billions"), [
    ("flux", "FluxTransformer2DModel", 11.9), ("sd35", "SD3Transformer2DModel", 8.1)])
def test_flow_transformers_have_their_published_parameter_counts(architecture: str, model_class: str,
                                                                 billions: float) -> None:
    import diffusers
    import torch

    with torch.device("meta"):  # shapes only: no memory for the weights
        transformer = getattr(diffusers, model_class)(**load_config(architecture)["transformer"])
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 1) == billions


@pytest.mark.parametrize(("architecture", "pipeline"), [("flux", "FluxPipeline"), ("sd35", "StableDiffusion3Pipeline")])
def test_shrunk_flow_models_build_and_run_with_every_component(architecture: str, pipeline: str) -> None:
    import torch

    pipe = build_pipeline(shrink(load_config(architecture)), device="cpu", dtype=torch.float32)
    assert type(pipe).__name__ == pipeline
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    image = pipe("a lighthouse", width=64, height=64, num_inference_steps=1, max_sequence_length=32,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_task_log_lines_parse() -> None:
    line = ("2026-01-01 INFO imagewire.task taskUUID=abc taskType=imageInference outcome=success results=1 "
            "total_ms=412.0 decode_ms=3.1 queue_ms=0.2 model_ms=380.4 encode_ms=9.8 store_ms=1.2 send_ms=0.4")
    parsed = parse_task_line(line)
    assert parsed is not None and parsed.total_ms == 412.0
    assert parsed.stages_ms == {"decode": 3.1, "queue": 0.2, "model": 380.4, "encode": 9.8, "store": 1.2, "send": 0.4}
    refused = parse_task_line("INFO imagewire.task taskUUID=abc taskType=ping outcome=invalidApiKey")
    assert refused is not None and refused.total_ms is None


def test_percentiles() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert summarize([])["p50"] is None


def test_the_model_switch_script_times_every_scenario(tmp_path: Path) -> None:
    from bench.model_switch import SCENARIOS
    from bench.model_switch import main as switch_main

    out = tmp_path / "switch.json"
    assert switch_main(["--switches", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [row["scenario"] for row in results["rows"]] == [label for label, _, _ in SCENARIOS]
    assert all(_numbers(row["switch_ms"]) and _numbers(row["image_after_switch_ms"]) for row in results["rows"])
    assert results["environment"]["command"].startswith("python -m bench.model_switch")


def test_the_editing_stages_benchmark_measures_every_stage():
    from bench.editing import image_stages

    rows = image_stages(repeats=1)
    assert {size for _, size, _ in rows} == {"512²", "1024²"}
    assert all(ms > 0 for _, _, ms in rows)


def test_the_cpu_quota_script_compares_torchs_default_with_the_servers_count(monkeypatch, capsys) -> None:
    import torch

    from bench.cpu_quota import main as quota_main
    from imagewire.server.engine import threads

    with monkeypatch.context() as patch:  # no quota, and the server's count is torch's default
        patch.setattr(threads, "usable_cores", torch.get_num_threads)
        assert quota_main(["--rounds", "1", "--per-round", "1"]) is None
    assert "nothing to compare" in capsys.readouterr().out
    default = torch.get_num_threads()
    if default < 2:
        pytest.skip("needs a default of two threads or more for a quota below it")
    monkeypatch.setattr(threads, "cpu_quota", lambda: 1.0)  # as a container started with --cpus 1 reads it
    results = quota_main(["--rounds", "1", "--per-round", "1"])
    assert results is not None and results["quota_cores"] == 1.0
    assert sorted(results["threads"]) == [1, default]
    assert all(row["p50_ms"] > 0 for row in results["threads"].values())
    assert results["environment"]["command"] == "python -m bench.cpu_quota --rounds 1 --per-round 1"
