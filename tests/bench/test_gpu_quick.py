"""The GPU quick suite's dry run on a CPU: the plans it would run, made from the real shapes, and its files."""

from __future__ import annotations

import json
from pathlib import Path

from bench.gpu_quick import main


def test_the_dry_run_plans_each_model_for_each_budget_and_writes_its_figures(tmp_path: Path, capsys) -> None:
    results = main(["--dry-run", "--out", str(tmp_path)])
    assert results["dry_run"] is True
    plans = {(row["model"], row["budget_gib"]): row["plan"] for row in results["rows"]}
    assert plans == {
        ("flux", 12.0): "sequential-offload", ("flux", 16.0): "sequential-offload",
        ("flux", 24.0): "model-offload", ("flux", None): "all-on-device",
        ("sdxl", 12.0): "all-on-device", ("sdxl", 16.0): "all-on-device",
        ("sdxl", 24.0): "all-on-device", ("sdxl", None): "all-on-device",
    }
    # Nothing measured without a GPU, and no figure invented.
    assert all("imagewire" not in row and "raw_diffusers" not in row for row in results["rows"])
    [written] = tmp_path.glob("gpu-quick-dry-run-*.json")
    assert json.loads(written.read_text())["rows"] == results["rows"]
    [table] = tmp_path.glob("gpu-quick-dry-run-*.md")
    assert "| flux | 24.0 | model-offload |" in table.read_text()
    assert "| flux | 24.0 | model-offload |" in capsys.readouterr().out


def test_a_budget_too_small_for_any_plan_is_a_refusal_row(tmp_path: Path) -> None:
    results = main(["--dry-run", "--models", "flux", "--budgets", "2", "--out", str(tmp_path)])
    [row] = results["rows"]
    assert row["plan"] is None and "does not fit this device" in row["refused"]


def test_python_m_bench_suite_gpu_quick_is_the_same_run(tmp_path: Path) -> None:
    from bench.cli import main as bench_main

    results = bench_main(["--suite", "gpu-quick", "--dry-run", "--models", "sdxl", "--budgets", "12",
                          "--out", str(tmp_path)])
    assert [(row["model"], row["plan"]) for row in results["rows"]] == [("sdxl", "all-on-device")]
