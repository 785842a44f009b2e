"""Render ahead: the views of micro-batch N+1 are rendered (and its targets staged) while step N computes.

`render_ahead(feed_batches, cfg, device, source)` wraps a feed's batches in a `runtime.ahead.RunAhead`: its
producer thread packs each batch's images into one pinned buffer, plans both render calls on the host
(crop boxes, gather indices, resize and blur matrices: `dpal.views.plan_*`), copies pixels and plans to
the device and renders there, then lets the target source stage what it can (`TargetSource.stage`: the
cached targets' host-to-device copies). On CUDA all of that runs on the producer's own stream and is
handed over with an event, so the step's stream only waits on the device, never the host. What the step
receives, a `ReadyBatch`, is on the device; no per-sample Python runs on the step's path.

The pixels are those of `dpal.views.render_view_sets` / `render_local_crops` on the same records, bit for
bit (the same plan and device work, only on another thread and stream).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import torch

from dpal.config import ViewConfig
from dpal.views import execute_local_crops, execute_view_sets, pack_view_set_images, plan_local_crops, plan_view_sets
from runtime.ahead import RunAhead
from train_student.data import FeedBatch


class ReadyBatch(NamedTuple):
    """One micro-batch ready for the step: views rendered and targets staged on the training device. (A named
    tuple, so that the hand-over finds every tensor in it to mark as used by the step's stream.)"""

    indices: torch.Tensor  # [b] image indices (host)
    views: dict[str, torch.Tensor]  # distill_step_losses view arguments: global_view, local_views, crowd_view
    staged: dict[str, torch.Tensor]  # what the target source staged (cached targets on the device; online: none)


def render_batch(batch: FeedBatch, cfg: ViewConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The views of one micro-batch on ``device``: global and crowd views, local crops (one upload of pixels,
    one of each plan)."""
    pin = device.type == "cuda"
    packed, images, backgrounds = pack_view_set_images(batch.images, batch.backgrounds, batch.view_params, pin)
    view_plan = plan_view_sets(images, backgrounds, batch.view_params, cfg, pin)
    local_plan = plan_local_crops(images, batch.local_params, cfg, pin)
    pixels = packed.pixels.to(device, non_blocking=pin)
    views = execute_view_sets(pixels, view_plan.to(device, non_blocking=pin))
    local_views = execute_local_crops(pixels, local_plan.to(device, non_blocking=pin))
    return {"global_view": views.global_view, "local_views": local_views, "crowd_view": views.crowd}


def render_ahead(batches: Iterable[FeedBatch], cfg: ViewConfig, device: torch.device, source, *,
                 depth: int = 1) -> RunAhead:
    """ReadyBatches of ``batches`` (a feed's epoch), rendered and staged on a producer thread, ``depth`` ahead."""
    def prepare(batch: FeedBatch) -> ReadyBatch:
        return ReadyBatch(batch.indices, render_batch(batch, cfg, device), source.stage(batch, device))

    return RunAhead(batches, prepare, device, depth=depth, name="dpal-render-ahead")
