"""Results as Markdown tables (printed, and pasted into BENCHMARKS.md) and as a JSON file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(value, digits) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _latency(results: dict[str, Any]) -> str:
    rows = []
    for row in results["latency"]:
        raw, served = row["raw_ms"], row["served_ms"]
        rows.append([row["workload"], raw["n"], raw["p50"], raw["p99"], served["p50"], served["p99"],
                     row["overhead_ms"]["p50"], row["overhead_ms"]["p99"],
                     _ratio(row["served_over_raw"]["p50"]), _ratio(row["served_over_raw"]["p99"])])
    text = table(["workload", "n", "raw p50 ms", "raw p99 ms", "served p50 ms", "served p99 ms",
                  "overhead p50 ms", "overhead p99 ms", "served/raw p50", "served/raw p99"], rows)
    reference = [[row["workload"], row["torch_threads"], row["raw_ms"]["p50"], at_default["torch_threads"],
                  at_default["raw_ms"]["p50"], at_default["raw_ms"]["p99"], _ratio(at_default["served_over_it"]["p50"])]
                 for row in results["latency"] if (at_default := row.get("raw_default_threads"))]
    if reference:
        text += ("\n\nThe server runs torch on fewer threads than torch's default (see server/engine/threads.py); "
                 "raw at the default, same run:\n\n"
                 + table(["workload", "server threads", "raw p50 ms", "default threads", "raw p50 ms at default",
                          "raw p99 ms at default", "served/raw-at-default p50"], reference))
    gpu = [[row["workload"], row.get("raw_gpu_peak_mib"), row.get("server_gpu_mib")]
           for row in results["latency"] if row.get("raw_gpu_peak_mib") is not None]
    if gpu:
        text += "\n\n" + table(["workload", "raw max_memory_allocated MiB", "server (nvidia-smi) MiB"], gpu)
    return text


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _stages(results: dict[str, Any]) -> str:
    parts = []
    for row in results["latency"]:
        breakdown = row["stages"]
        if not breakdown.get("tasks"):
            continue
        client_p50 = breakdown["client_ms"]["p50"] or 0.0
        rows = []
        for stage, summary in breakdown["stages_ms"].items():
            share = summary["p50"] / client_p50 * 100 if client_p50 and summary["p50"] is not None else None
            rows.append([stage, summary["p50"], summary["p99"], None if share is None else f"{share:.1f} %"])
        rows.append(["server total", breakdown["server_total_ms"]["p50"], breakdown["server_total_ms"]["p99"], ""])
        rows.append(["client round trip", client_p50, breakdown["client_ms"]["p99"], "100 %"])
        parts.append(f"{row['workload']} ({breakdown['tasks']} tasks; model − raw at p50: "
                     f"{_cell(breakdown['model_minus_raw_p50_ms'], 2)} ms)\n\n"
                     + table(["stage", "p50 ms", "p99 ms", "share of round trip p50"], rows, digits=2))
    return "\n\n".join(parts)


def _concurrency(results: dict[str, Any]) -> str:
    rows = []
    for section in results["concurrency"]:
        rows.append([section["workload"], "raw loop", section["raw_images_per_s"], _ratio(1.0),
                     _ratio(section.get("raw_relative_to_default_threads")), None, None, None, 1, None])
        if batched := section.get("raw_batched"):
            rows.append([section["workload"], f"raw loop, {batched['images_per_call']} per call",
                         batched["images_per_s"],
                         _ratio(batched["relative_to_raw"]), None, None, None, None, batched["images_per_call"], None])
        for level in section["levels"]:
            latency = level["latency_ms"]
            spread = level.get("round_ratios") or []
            vs_raw = _ratio(level["relative_to_raw"])
            if len(spread) > 1:
                vs_raw += f" ({min(spread):.2f}–{max(spread):.2f})"
            rows.append([section["workload"], level["connections"], level["images_per_s"],
                         vs_raw, _ratio(level.get("relative_to_raw_default_threads")),
                         latency["p50"], latency["p99"], level["server_model_ms"]["p50"],
                         level.get("images_per_call"), f"{level['device_busy'] * 100:.1f} %"])
    return table(["workload", "connections", "images/s", "vs raw (rounds' range)", "vs raw at torch default threads",
                  "latency p50 ms", "latency p99 ms", "model ms per image in server, p50", "images per call",
                  "device busy"], rows, digits=2)


def _pings(results: dict[str, Any]) -> str:
    idle = results["idle_ping_ms"]
    rows = [["idle", idle["n"], idle["p50"], idle["p99"], idle["max"]]]
    for section in results["concurrency"]:
        load = section["ping_under_load"]
        rtt = load["rtt_ms"]
        rows.append([f"{load['connections']} connections busy ({section['workload']})", rtt["n"], rtt["p50"],
                     rtt["p99"], rtt["max"]])
    return table(["while", "pings", "p50 ms", "p99 ms", "max ms"], rows, digits=2)


def _neighbour(results: dict[str, Any]) -> str:
    row = results["neighbour"]
    served = row["served"]
    rows = [["raw loop, machine quiet", row["raw_images_per_s_quiet"], None, None, None],
            ["raw loop, beside the busy process", row["raw_images_per_s_beside_busy"], None, None, None],
            [f"served, {row['connections']} connections, beside the busy process", served["images_per_s"],
             served["latency_ms"]["p50"], served["latency_ms"]["p99"], served["ping_rtt_ms"]["p99"]]]
    return (f"{row['workload']}, torch threads {row['torch_threads']}; served is "
            f"{_ratio(row['served_relative_to_quiet_raw'])}× the quiet raw loop\n\n"
            + table(["", "images/s", "latency p50 ms", "latency p99 ms", "ping p99 ms"], rows, digits=2))


def _uploads(results: dict[str, Any]) -> str:
    rows = [[f"{row['format']} {row['size']}²", round(row["image_bytes"] / 1024, 1), row["latency_ms"]["p50"],
             row["latency_ms"]["p99"], row["uploads_per_s"], row["mb_per_s"]] for row in results["uploads"]]
    return table(["data URI", "image KiB", "latency p50 ms", "latency p99 ms", "uploads/s", "MB/s"], rows)


def _encoding(results: dict[str, Any]) -> str:
    rows = [[f"{row['size']}²", row["encoding"], round(row["bytes"] / 1024, 1), row["encode_ms"]["p50"],
             row["encode_ms"]["p99"], row["base64_ms"]["p50"]] for row in results["encoding"]]
    return table(["size", "encoding", "KiB", "encode p50 ms", "encode p99 ms", "base64 of it p50 ms"], rows, digits=2)


def _memory(results: dict[str, Any]) -> str:
    memory = results["memory"]
    samples = ", ".join(f"{sample['tasks']}: {sample['rss_mib']:.0f}" for sample in memory["samples"])
    rows = [["RSS after load and warm-up", memory["rss_after_load_mib"]],
            ["peak RSS after load and warm-up (VmHWM)", memory["peak_rss_after_load_mib"]],
            [f"RSS after {memory['tasks']} tasks", memory["rss_final_mib"]],
            [f"peak RSS after {memory['tasks']} tasks (VmHWM)", memory["peak_rss_final_mib"]],
            ["growth over the second half", memory["growth_second_half_mib"]]]
    return (table(["server process", "MiB"], rows)
            + f"\n\nRSS (MiB) by tasks done ({', '.join(memory['workloads'])}): {samples}")


def _cluster(results: dict[str, Any]) -> str:
    cluster = results["cluster"]
    if cluster.get("skipped"):
        return f"skipped: {cluster['skipped']}"
    rows = [[row["engine"], row["replicas"] or "-", row["latency_ms"]["p50"], row["latency_ms"]["p99"],
             row["overhead_p50_ms"], row["images_per_s"], _ratio(row["throughput_vs_local"])]
            for row in cluster["rows"]]
    return (f"{cluster['workload']}; per round and configuration, latency: {cluster['sequential']} tasks one at a "
            f"time; throughput: {cluster['connections']} connections × {cluster['tasks_per_connection']} tasks; "
            f"{cluster['rounds']} round(s), each a fresh server\n\n"
            + table(["engine", "replicas", "p50 ms", "p99 ms", "p50 over local, ms", "images/s", "vs local"], rows))


def _conditions(results: dict[str, Any]) -> str:
    rows = [[label, values["foreign_cpu_cores"], values["foreign_cpu_cores_before"]]
            for label, values in results["conditions"].items()]
    return table(["section", "other processes' CPU during it (cores)", "just before (cores)"], rows, digits=3)


def _checks(results: dict[str, Any]) -> str:
    rows = [[check["check"], check["target"], check["value"], check["passed"]] for check in results["checks"]]
    return table(["target", "wanted", "measured", "met"], rows, digits=3)


_SECTIONS = (
    ("latency", "Raw pipeline vs served, one request at a time", _latency),
    ("latency", "Where the time goes (server log, sequential served requests)", _stages),
    ("concurrency", "Throughput by concurrent connections (one request in flight each)", _concurrency),
    ("concurrency", "Ping round trip", _pings),
    ("neighbour", "Throughput beside one busy process (a shared machine)", _neighbour),
    ("uploads", "imageUpload with a data URI (sequential)", _uploads),
    ("encoding", "Output encoding in-process (storage.encode)", _encoding),
    ("memory", "Server memory", _memory),
    ("cluster", "Cluster: --engine local beside --engine ray", _cluster),
    ("conditions", "Machine load from other processes", _conditions),
    ("checks", "Targets", _checks),
)


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    accelerator = env["accelerator"]
    device = accelerator.get("name", "CPU") if accelerator["kind"] == "cuda" else "CPU"
    parts = [f"`{env['command']}` — {env['date']}\n\n"
             f"device: {device} ({env['device']}); CPU: {env['cpu_model']}, {env['cpu_cores']} cores, "
             f"torch threads: {env['server_torch_threads']} in the server and the raw loop "
             f"(torch's default here: {env['torch_default_threads']}); Python {env['python']}; {versions}; "
             f"revision {env['git_revision']}"]
    for key, title, render_section in _SECTIONS:
        if results.get(key):
            parts.append(f"### {title}\n\n{render_section(results)}")
    return "\n\n".join(parts) + "\n"


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``<suite>[-quick]-<date>.json`` and a ``.md`` with the same tables, side by side in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = results["environment"]["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = f"{results['suite']}{'-quick' if results['quick'] else ''}-{stamp}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    markdown_path = out_dir / f"{stem}.md"
    markdown_path.write_text(render(results), encoding="utf-8")
    return json_path, markdown_path
