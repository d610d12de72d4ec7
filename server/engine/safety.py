"""Content safety checks: the safety checker diffusers' Stable Diffusion pipelines use, on given pictures.

One call checks the pictures of every job given (they name the same checker); each job gets one flag per
picture, True where the checker found unwanted content. What a flagged picture becomes is the task's
business (``tasks/content_safety.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from imagewire.tasks.jobs import Emit, SafetyCheckJob

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine


def run(engine: DiffusersEngine, jobs: Sequence[SafetyCheckJob], emit: Emit) -> None:
    pipelines = engine.pipelines
    checker, processor = pipelines.safety_checker(jobs[0].checker, jobs[0].weights)
    pictures = [picture.convert("RGB") for job in jobs for picture in job.pictures]
    features = processor(images=pictures, return_tensors="pt").pixel_values
    with torch.inference_mode():
        # The checker blacks out flagged entries of ``images``; only its flags are wanted here.
        _, flags = checker(clip_input=features.to(pipelines.device, pipelines.dtype_of(jobs[0].checker)),
                           images=[np.zeros(1) for _ in pictures])
    start = 0
    for index, job in enumerate(jobs):
        emit(index, [bool(flag) for flag in flags[start : start + len(job.pictures)]])
        start += len(job.pictures)
