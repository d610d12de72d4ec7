"""Where one task's time goes, from the server's own ``imagewire.task`` log lines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.server_process import TaskLog
from bench.stats import milliseconds, summarize

STAGES = ("decode", "queue", "model", "encode", "store", "send")


def stage_breakdown(logs: Sequence[TaskLog], client_seconds: Mapping[str, float],
                    raw_seconds: Sequence[float]) -> dict[str, Any]:
    """Per stage p50/p99 in ms, plus the two remainders the stages do not name.

    ``in_task_other`` is the server's total minus its named stages (validation, thread hand-offs);
    ``outside_task`` is what the client waited beyond the server's total (socket, frame parsing,
    and the client itself). ``model_minus_raw`` compares the pipeline inside the server with the
    same call made raw.
    """
    logs = [log for log in logs if log.outcome == "success" and log.total_ms is not None]
    if not logs:
        return {"tasks": 0}
    per_stage = {stage: [log.stages_ms.get(stage, 0.0) for log in logs] for stage in STAGES}
    totals = [log.total_ms or 0.0 for log in logs]
    other = [total - sum(log.stages_ms.get(stage, 0.0) for stage in STAGES)
             for log, total in zip(logs, totals, strict=True)]
    outside = [client_seconds[log.task_uuid] * 1000 - (log.total_ms or 0.0)
               for log in logs if log.task_uuid in client_seconds]
    stages: dict[str, Any] = {stage: summarize(values) for stage, values in per_stage.items()}
    stages["in_task_other"] = summarize(other)
    stages["outside_task"] = summarize(outside)
    client = summarize([client_seconds[log.task_uuid] * 1000 for log in logs if log.task_uuid in client_seconds])
    raw = summarize(milliseconds(raw_seconds))
    model_p50 = stages["model"]["p50"]
    return {
        "tasks": len(logs),
        "stages_ms": stages,
        "server_total_ms": summarize(totals),
        "client_ms": client,
        "model_minus_raw_p50_ms": None if raw["p50"] is None else round(model_p50 - raw["p50"], 2),
    }
