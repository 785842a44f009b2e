"""`python -m cache_teacher bench`: teacher-forward-only throughput vs the full caching pipeline, one run.

teacher only: the teacher forward (`TeacherSide.run_teacher`) on one pre-rendered batch, repeated (the ceiling).
full pipeline: the real `run` code path into a fresh store (decode + render + teacher + shape mask +
encode + compress + fsync + write), double-buffered (`cache_teacher.pipeline`: the next batch renders while
the teacher runs), and the same run on the serial path (render, teacher, copy back, in turn) for comparison.
Target on a GPU: the pipeline >= 90% of teacher-only. Prints a table, writes JSON.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from cache_teacher.run import RunConfig, cached_views, default_batch_size, run
from dpal.config import TeacherSpec
from dpal.recipes import TEACHERS
from dpal.teachers import load_teacher, teacher_spec
from formats.images import ImageFile
from formats.teacher_side import BackgroundPool, TeacherSide, first_view_sets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(teacher: str, weights: str, images: str, backgrounds: str, *, batch_size: int | None = None,
          iterations: int = 5, num_images: int | None = None, views_per_image: int = 2,
          target_format: str = "float16", device: str | None = None, json_out: str | None = None,
          teacher_options: dict | None = None, teachers: dict[str, TeacherSpec] = TEACHERS) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch_size or default_batch_size(dev)
    spec, cfg = teacher_spec(teacher, teachers), cached_views(teacher)
    image_file = ImageFile(images)
    side = TeacherSide(load_teacher(spec, weights, **(teacher_options or {})).to(dev), BackgroundPool(backgrounds),
                       cfg, dev, batch)

    indices = [i % len(image_file) for i in range(batch)]
    params = first_view_sets(0, indices, 1, len(side.backgrounds), cfg)
    views = [torch.from_numpy(image_file.image(i)) for i in indices]
    side.targets(views, params)  # warm-up (allocations, autotuning)
    rendered = side.render(views, params)
    _sync(dev)
    start = time.perf_counter()
    for _ in range(iterations):
        side.run_teacher(rendered.global_view, rendered.crowd)
    _sync(dev)
    teacher_rate = iterations * batch / (time.perf_counter() - start)

    count = min(num_images or max(1, iterations * batch // views_per_image), len(image_file))
    rates = {}
    for overlap in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            subset_cfg = RunConfig(teacher=teacher, weights=weights, images=images, backgrounds=backgrounds,
                                   views_per_image=views_per_image, out=str(Path(tmp) / "bench.zarr"),
                                   target_format=target_format, batch_size=batch, device=str(dev), progress=False,
                                   calibration_images=min(count, batch), limit_images=count, overlap=overlap)
            summary = run(subset_cfg, teachers=teachers)
        rates[overlap] = summary["computed_view_sets"] / summary["seconds"]
    pipeline_rate = rates[True]
    result = {"teacher": teacher, "device": str(dev), "batch_size": batch, "target_format": target_format,
              "teacher_only_view_sets_per_s": teacher_rate, "pipeline_view_sets_per_s": pipeline_rate,
              "pipeline_fraction": pipeline_rate / teacher_rate, "pipeline_view_sets": summary["computed_view_sets"],
              "serial_view_sets_per_s": rates[False], "serial_fraction": rates[False] / teacher_rate}
    print(f"{'stage':<34}{'view sets/s':>14}")
    print(f"{'teacher forward only':<34}{teacher_rate:>14.2f}")
    print(f"{'full pipeline (render..write)':<34}{pipeline_rate:>14.2f}")
    print(f"{'same, serial (no overlap)':<34}{rates[False]:>14.2f}")
    print(f"pipeline reaches {100 * result['pipeline_fraction']:.1f}% of teacher-only throughput "
          f"({dev}, batch {batch}, {target_format}, target on GPU: >= 90%)")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
        print(f"wrote {json_out}")
    return result

