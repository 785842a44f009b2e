"""`python -m train_student bench`: what the cache buys, measured in one run on one device and batch.

Three figures: samples/s of the data feed alone on the CPU (FFCV decoding + Zarr block reads + batch
assembly, no model), of a training step with cached targets (views re-rendered from stored
parameters, student + decoder forward/backward, AdamW, EMA), and of the same step with the teacher
computing the targets online (the original loop). Steps are timed on batches fetched beforehand, so
the step figures are compute only; the feed figure says whether the loader keeps up with them.
A fourth run pulls the cached-target steps' batches from the live feed, as training does, and reports
the shares of its step time spent waiting for data and rendering the views.
Prints a table and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from dpal.recipes import get_recipe, list_recipes
from formats.cli import (DEFAULT_CALIBRATION_IMAGES, NON_NEGATIVE, POSITIVE, add_teacher_option_arguments,
                         parse_teacher_options)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train_student bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, choices=list_recipes(), metavar="NAME",
                   help=f"one of: {', '.join(list_recipes())}")
    p.add_argument("--store", required=True, metavar="STORE.zarr", help="target store from `cache_teacher run`")
    p.add_argument("--images", required=True, metavar="IMAGES.beton", help="the images file the store was cached from")
    p.add_argument("--backgrounds", required=True, metavar="BG.beton",
                   help="the background pool the store was cached with")
    p.add_argument("--teacher-weights", metavar="W.pth", help="teacher checkpoint for the online step (required "
                   "unless --feed-only)")
    p.add_argument("--batch-size", type=POSITIVE, metavar="N",
                   help="per-device batch (>= 1, default: the recipe's per-GPU batch)")
    p.add_argument("--steps", type=POSITIVE, default=10, metavar="N",
                   help="timed training steps per mode (>= 1, default 10)")
    p.add_argument("--warmup-steps", type=NON_NEGATIVE, default=2, metavar="N",
                   help="untimed steps first (>= 0, default 2)")
    p.add_argument("--feed-batches", type=POSITIVE, default=50, metavar="N",
                   help="timed feed batches (>= 1, default 50)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="device of the timed steps (auto: CUDA when visible)")
    p.add_argument("--workers", type=POSITIVE, metavar="N",
                   help="FFCV decoding threads beside the timed steps (>= 1, default: as for training)")
    p.add_argument("--feed-workers", type=POSITIVE, default=os.cpu_count(), metavar="N",
                   help="FFCV decoding threads for the feed-alone figure (>= 1, default: all cores)")
    p.add_argument("--calibration-images", type=POSITIVE, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                   help=f"shape-mask calibration images for the online step (>= 1, default "
                        f"{DEFAULT_CALIBRATION_IMAGES})")
    add_teacher_option_arguments(p)
    p.add_argument("--reference-path", action="store_true", help="force the plain-PyTorch reference ops")
    p.add_argument("--feed-only", action="store_true", help="measure only the data feed (no model, no teacher)")
    p.add_argument("--out", default="train_bench.json", metavar="JSON", help="where to write the figures")
    return p


def _batches(feed, count: int, *, keep: bool):
    """`count` micro-batches, cycling through epochs; kept ones own their images (FFCV reuses its buffers)."""
    epoch = 0
    while count > 0:
        for batch in feed.epoch(epoch):
            yield dataclasses.replace(batch, images=[image.clone() for image in batch.images]) if keep else batch
            count -= 1
            if count == 0:
                return
        epoch += 1


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, optimizer, ema, batches, recipe, device, warmup: int, **online) -> float:
    """Samples/s of full training steps (render, targets, forward, backward, AdamW, EMA) on given batches."""
    from train_student.train import apply_update, batch_losses, make_autocast

    autocast = make_autocast(device, recipe.optim)
    student_params, ema_params = list(model.student.parameters()), list(ema.parameters())
    for index, batch in enumerate(batches):
        if index == warmup:
            _sync(device)
            start = time.perf_counter()
        terms = batch_losses(model, batch, recipe, device, autocast, 0.1, **online)
        terms["total"].backward()
        apply_update(optimizer, 1e-4, student_params, ema_params, 0.996)
    _sync(device)
    timed = len(batches) - warmup
    return timed * len(batches[0].indices) / (time.perf_counter() - start)


def live_step_shares(model, optimizer, ema, feed, recipe, device, warmup: int, steps: int) -> dict:
    """Cached-target steps on batches pulled from the feed as training pulls them: samples/s, and the shares
    of that time spent waiting for the next batch and rendering its views. The render is timed on its own,
    synchronised, on the same batch just before the step (which renders it again); that extra render is
    not counted in the step time."""
    from train_student.train import apply_update, batch_losses, make_autocast, render_batch

    autocast = make_autocast(device, recipe.optim)
    student_params, ema_params = list(model.student.parameters()), list(ema.parameters())
    batches = _batches(feed, warmup + steps, keep=False)
    waited = rendering = elapsed = 0.0
    samples = 0
    for index in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        render_batch(batch, recipe, device)
        _sync(device)
        rendered = time.perf_counter()
        terms = batch_losses(model, batch, recipe, device, autocast, 0.1)
        terms["total"].backward()
        apply_update(optimizer, 1e-4, student_params, ema_params, 0.996)
        _sync(device)
        if index >= warmup:
            waited, rendering = waited + fetched - start, rendering + rendered - fetched
            elapsed += time.perf_counter() - start - (rendered - fetched)
            samples += len(batch.indices)
    return {"live_step_samples_per_s": samples / elapsed, "data_wait_share": waited / elapsed,
            "render_share": rendering / elapsed}


def training_step_rates(args, recipe, store, backgrounds, plan, device, batch: int) -> dict:
    """Samples/s of the cached-target step and of the online-teacher step, same model, device and batch."""
    import torch

    from dpal.teachers import load_teacher
    from formats.images import ImageFile
    from train_student.data import CachedFeed, OnlineFeed
    from train_student.train import build_distiller, fit_online_mask_calibration

    total = args.warmup_steps + args.steps
    cached_feed = CachedFeed(args.images, store, backgrounds, plan, recipe.views, workers=args.workers,
                             pin=device.type == "cuda")
    cached_batches = list(_batches(cached_feed, total, keep=True))
    online_plan = dataclasses.replace(plan, num_images=ImageFile(args.images).num_images, chunk_images=1)
    online_batches = list(_batches(OnlineFeed(args.images, backgrounds, online_plan, recipe.views,
                                              workers=args.workers), total, keep=True))
    torch.manual_seed(0)
    model, ema, optimizer = build_distiller(recipe, device, 1e-4)
    cached_rate = time_steps(model, optimizer, ema, cached_batches, recipe, device, args.warmup_steps)
    live = live_step_shares(model, optimizer, ema, cached_feed, recipe, device, args.warmup_steps, args.steps)
    teacher = load_teacher(recipe.teacher.name, args.teacher_weights, **args.teacher_options).to(device)
    calibration = fit_online_mask_calibration(teacher, args.images, backgrounds, recipe, device,
                                              count=args.calibration_images, seed=0, batch=batch)
    online_rate = time_steps(model, optimizer, ema, online_batches, recipe, device, args.warmup_steps,
                             teacher=teacher, mask_calibration=calibration)
    return {"cached_step_samples_per_s": cached_rate, "online_step_samples_per_s": online_rate,
            "speedup": cached_rate / online_rate, **live}


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.teacher_weights is None and not args.feed_only:
        cli.error("--teacher-weights is required (or pass --feed-only)")
    args.teacher_options = parse_teacher_options(cli, args, get_recipe(args.recipe).teacher)
    from formats.cli import exit_status
    return exit_status(lambda: bench(args))


def bench(args: argparse.Namespace) -> None:
    """Measure, print the table and write the JSON (see the module docstring)."""
    import torch

    from dpal import dispatch
    from formats.images import images_fingerprint
    from formats.store import open_store
    import kernels
    from train_student.data import BackgroundPool, CachedFeed, FeedPlan
    from train_student.train import TrainingError, default_workers, setup_distributed

    kernels.register()  # the fused ops for CUDA tensors, as training runs them
    if args.reference_path:
        dispatch.force_reference(True)
    if args.workers is None:
        args.workers = default_workers(args.device)
    _, _, device = setup_distributed(args.device)
    recipe = get_recipe(args.recipe)
    batch = args.batch_size or recipe.optim.batch_per_gpu
    store = open_store(args.store)
    store.check_compatible(recipe, recipe.views, images_fingerprint(args.images), images_fingerprint(args.backgrounds))
    backgrounds = BackgroundPool(args.backgrounds)
    plan = FeedPlan(num_images=store.num_images, chunk_images=store.chunk_images, micro_batch=batch, world_size=1,
                    rank=0, accum_steps=1, seed=0, window_images=1024)
    if plan.steps_per_epoch < 1:
        raise TrainingError(f"batch {batch} is larger than the store's {store.num_images} images")

    # 1. the feed alone, on the CPU (first batch untimed: FFCV compiles its pipeline then)
    feed = CachedFeed(args.images, store, backgrounds, plan, recipe.views, workers=args.feed_workers, pin=False)
    feed_batches = _batches(feed, args.feed_batches + 1, keep=False)
    next(feed_batches)
    start, start_cpu = time.perf_counter(), time.process_time()
    fed = sum(len(b.indices) for b in feed_batches)
    feed_seconds, feed_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    feed_rate = fed / feed_seconds
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    result = {"recipe": recipe.name, "device": device_name, "batch": batch, "steps": args.steps,
              "target_format": store.attrs["target_format"], "reference_path": dispatch.reference_forced(),
              "feed_samples_per_s": feed_rate, "feed_workers": args.feed_workers,
              "feed_cpu_ms_per_sample": 1000 * feed_cpu_seconds / fed}
    rows = [("data feed alone (CPU: FFCV + Zarr + batch assembly)", f"{feed_rate:,.1f}")]

    if not args.feed_only:  # 2. cached-target steps and 3. online-teacher steps, same model, device and batch
        result.update(training_step_rates(args, recipe, store, backgrounds, plan, device, batch))
        rows += [("training step, cached targets", f"{result['cached_step_samples_per_s']:,.2f}"),
                 ("training step, --teacher-online", f"{result['online_step_samples_per_s']:,.2f}"),
                 ("speed-up of the cache", f"{result['speedup']:.2f}x"),
                 ("training step, cached targets, batches from the live feed",
                  f"{result['live_step_samples_per_s']:,.2f}")]
    width = max(len(name) for name, _ in rows)
    print(f"train_student bench: {recipe.name}, batch {batch}, {device_name}, {store.attrs['target_format']} targets")
    print(f"| {'measure':<{width}} | samples/s |")
    print(f"|{'-' * (width + 2)}|-----------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value:>9} |")
    print(f"data feed: {result['feed_cpu_ms_per_sample']:.3f} ms of CPU time (all threads) per sample")
    if not args.feed_only:
        print(f"live-feed step time: {100 * result['data_wait_share']:.1f}% waiting for data, "
              f"{100 * result['render_share']:.1f}% rendering views")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"figures written to {args.out}")
