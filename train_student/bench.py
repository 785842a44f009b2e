"""`python -m train_student bench`: what the cache buys, measured in one run on one device and batch.

Figures (samples/s): the data feed alone on the CPU (FFCV decoding + Zarr block reads + batch assembly, no
model); the training step with cached targets as a run takes it: every step row runs the training loop
itself (`loop.run_steps`, with the recipe's schedule as a one-device run at this batch, no checkpoints),
here over `prefetch.render_ahead` (views of batch N+1 rendered, and its targets copied to the device, while
step N computes); the same step with views and targets already staged on the device (the ceiling the cached
step is held to: >= 95%); and the same loop with the teacher computing the targets online (the original
method). Steps run on batches fetched beforehand, so these figures are compute only; the feed figure says
whether the loader keeps up with them. A last run pulls the cached-target steps' batches from the live
feed, as training does, and reports the share of its time spent waiting for the next ready batch, and
what rendering costs when it is not overlapped (timed on its own, synchronised) relative to the staged step.
`--compile both` adds the cached and staged steps with the student and the decoder compiled.
Prints a table and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

from formats.cli import add_teacher_option_arguments, parse_teacher_options
from formats.schema import DEFAULT_CALIBRATION_IMAGES
from kernels import select_interpreter
from runtime.arguments import NON_NEGATIVE, POSITIVE, usable_cores, worker_count
from runtime.cli import ConfigError
from runtime.startup import startup
from train_student.spec import add_recipe_arguments, chosen_recipe, resolved_recipe


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train_student bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(p)
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
    p.add_argument("--workers", type=worker_count, metavar="N",
                   help="FFCV decoding threads beside the timed steps (1 up to the CPU cores, default: as for "
                        "training)")
    p.add_argument("--feed-workers", type=worker_count, default=usable_cores(), metavar="N",
                   help="FFCV decoding threads for the feed-alone figure (1 up to the CPU cores, default: all)")
    p.add_argument("--calibration-images", type=POSITIVE, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                   help=f"shape-mask calibration images for the online step (>= 1, default "
                        f"{DEFAULT_CALIBRATION_IMAGES})")
    add_teacher_option_arguments(p)
    p.add_argument("--reference-path", action="store_true", help="force the plain-PyTorch reference ops")
    p.add_argument("--compile", choices=("off", "on", "both"), default="off",
                   help="torch.compile the student and the decoder for the step rows; both: eager "
                        "and compiled rows (default off)")
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


class Fetched:
    """Micro-batches fetched beforehand, served as a feed whose every epoch is all of them (the timed steps
    fit in one)."""

    def __init__(self, batches: list):
        self.batches = batches

    def epoch(self, epoch: int, start_micro: int = 0):
        return iter(self.batches[start_micro:])


def timed_steps(trainer, schedule, ready_batches, args, batch: int) -> dict:
    """`--warmup-steps` untimed then `--steps` timed training steps, run by the training loop itself
    (`loop.run_steps`, values read one step late) over ``ready_batches``: samples/s, and the share of that
    time spent waiting for the next ready batch."""
    from train_student.loop import StepTimer, run_steps

    total = args.warmup_steps + args.steps
    timer = StepTimer(global_batch=batch, untimed_steps=args.warmup_steps, last_step=total, device=trainer.device)
    run_steps(trainer, schedule, ready_batches, timer, step=0, last_step=total)
    return timer.rates()


def render_seconds(batches, recipe, device) -> float:
    """Mean seconds to render one batch's views on its own, synchronised (what the step would pay in line)."""
    from train_student.prefetch import render_batch

    render_batch(batches[0], recipe.views, device)  # warm-up: device constants are cached on first use
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        render_batch(batch, recipe.views, device)
    _sync(device)
    return (time.perf_counter() - start) / len(batches)


def step_rates(trainer, schedule, batches, recipe, args, batch: int) -> dict:
    """The cached-target step as trained (rendered ahead) and the same step on views and targets staged on the
    device beforehand."""
    from train_student.loop import rendered_ahead
    from train_student.prefetch import render_ahead

    cached = timed_steps(trainer, schedule, rendered_ahead(Fetched(batches), recipe.views, trainer.device,
                                                           trainer.source), args, batch)
    with render_ahead(iter(batches), recipe.views, trainer.device, trainer.source, depth=len(batches)) as ahead:
        staged = list(ahead)
    _sync(trainer.device)
    ceiling = timed_steps(trainer, schedule, lambda epoch, start_micro: nullcontext(iter(staged)), args, batch)
    return {"cached": cached["samples_per_s"], "staged": ceiling["samples_per_s"]}


def training_step_rates(args, recipe, store, backgrounds, plan, device, batch: int) -> dict:
    """Samples/s of the cached-target step (rendered ahead, and staged beforehand), of the online-teacher step,
    and of the cached step on the live feed; eager, and compiled with ``--compile on|both``. The steps follow
    the recipe's schedule as a one-device run at this batch would."""
    import torch

    from dpal.teachers import load_teacher
    from formats.images import ImageFile
    from train_student.data import CachedFeed, OnlineFeed
    from train_student.loop import Schedule, Trainer, rendered_ahead
    from train_student.step import CachedTargets, OnlineTeacher, build_distiller, make_autocast

    total = args.warmup_steps + args.steps
    schedule = Schedule(dataclasses.replace(recipe.optim, accum_steps=1), plan.steps_per_epoch,
                        recipe.optim.peak_lr(batch))
    autocast = make_autocast(device, recipe.optim)
    cached_feed = CachedFeed(args.images, store, backgrounds, plan, recipe.views, workers=args.workers,
                             pin=device.type == "cuda")
    cached_batches = list(_batches(cached_feed, total, keep=True))
    online_plan = dataclasses.replace(plan, num_images=ImageFile(args.images).num_images, chunk_images=1)
    online_batches = list(_batches(OnlineFeed(args.images, backgrounds, online_plan, recipe.views,
                                              workers=args.workers), total, keep=True))
    result = {}
    for compiled in {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]:
        torch.manual_seed(0)
        model, ema, optimizer = build_distiller(recipe, device, schedule.peak_lr, compile_model=compiled)
        trainer = Trainer(model, ema, optimizer, CachedTargets(), autocast, world_size=1)
        rates = step_rates(trainer, schedule, cached_batches, recipe, args, batch)
        prefix = "compiled_" if compiled else ""
        result.update({f"{prefix}cached_step_samples_per_s": rates["cached"],
                       f"{prefix}staged_step_samples_per_s": rates["staged"],
                       f"{prefix}cached_vs_staged": rates["cached"] / rates["staged"]})
    if "compiled_cached_step_samples_per_s" in result and "cached_step_samples_per_s" in result:
        result["compile_speedup"] = result["compiled_cached_step_samples_per_s"] / result["cached_step_samples_per_s"]
    last = "compiled_" if args.compile != "off" else ""  # the online and live-feed rows use the last model built
    live_rate = timed_steps(trainer, schedule, rendered_ahead(cached_feed, recipe.views, device, trainer.source),
                            args, batch)
    step_seconds = batch / result[f"{last}staged_step_samples_per_s"]
    teacher = load_teacher(recipe.teacher.name, args.teacher_weights, **args.teacher_options).to(device)
    online = dataclasses.replace(trainer, source=OnlineTeacher.calibrated(
        teacher, args.images, backgrounds, recipe.views, device, count=args.calibration_images, seed=0, batch=batch))
    online_rate = timed_steps(online, schedule, rendered_ahead(Fetched(online_batches), recipe.views, device,
                                                               online.source), args, batch)
    cached_rate = result[f"{last}cached_step_samples_per_s"]
    return {**result, "online_step_samples_per_s": online_rate["samples_per_s"],
            "speedup": cached_rate / online_rate["samples_per_s"],
            "live_step_samples_per_s": live_rate["samples_per_s"], "data_wait_share": live_rate["wait_share"],
            "render_share": render_seconds(cached_batches[:max(1, args.steps)], recipe, device) / step_seconds}


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    try:
        args.recipe = chosen_recipe(args)
    except ConfigError as exc:
        cli.error(str(exc))
    if args.recipe is None:
        cli.error("missing --recipe (or --teacher with --student)")
    if args.teacher_weights is None and not args.feed_only:
        cli.error("--teacher-weights is required (or pass --feed-only)")
    select_interpreter()  # before anything imports timm (the teacher options and composed recipes do), and triton
    startup(reuse_freed_memory=True)  # the feed-alone figure is of pageable batches, as CPU training feeds them
    try:
        teacher = resolved_recipe(args.recipe).teacher
    except ConfigError as exc:
        cli.error(str(exc))
    args.teacher_options = parse_teacher_options(cli, args, teacher)
    from runtime.cli import exit_status
    return exit_status(lambda: bench(args))


def bench(args: argparse.Namespace) -> None:
    """Measure, print the table and write the JSON (see the module docstring)."""
    import torch

    from dpal import dispatch
    from dpal.errors import UserError
    from formats.images import images_fingerprint
    from formats.store import open_store
    from formats.teacher_side import BackgroundPool
    import kernels
    from train_student.data import CachedFeed, FeedPlan, compute_threads, default_workers
    from runtime.distributed import setup_distributed

    kernels.register()  # the fused ops for CUDA tensors, as training runs them
    if args.reference_path:
        dispatch.force_reference(True)
    if args.workers is None:
        args.workers = default_workers(args.device)
    torch.set_num_threads(compute_threads(None))  # as a fresh training run computes
    _, _, device = setup_distributed(args.device)
    recipe = resolved_recipe(args.recipe)
    batch = args.batch_size or recipe.optim.batch_per_gpu
    store = open_store(args.store)
    store.check_compatible(recipe, recipe.views, images_fingerprint(args.images), images_fingerprint(args.backgrounds))
    backgrounds = BackgroundPool(args.backgrounds)
    plan = FeedPlan(num_images=store.num_images, chunk_images=store.chunk_images, micro_batch=batch, world_size=1,
                    rank=0, accum_steps=1, seed=0, window_images=1024)
    if plan.steps_per_epoch < 1:
        raise UserError(f"batch {batch} is larger than the store's {store.num_images} images")

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
        for prefix, what in (("", ""), ("compiled_", ", torch.compile")):
            if f"{prefix}cached_step_samples_per_s" in result:
                rows += [(f"training step, cached targets (rendered ahead){what}",
                          f"{result[f'{prefix}cached_step_samples_per_s']:,.2f}"),
                         (f"training step, views and targets staged on the device{what}",
                          f"{result[f'{prefix}staged_step_samples_per_s']:,.2f}"),
                         (f"cached step / staged step{what} (target >= 95%)",
                          f"{100 * result[f'{prefix}cached_vs_staged']:.1f}%")]
        rows += [("training step, --teacher-online", f"{result['online_step_samples_per_s']:,.2f}"),
                 ("speed-up of the cache", f"{result['speedup']:.2f}x"),
                 ("training step, cached targets, batches from the live feed",
                  f"{result['live_step_samples_per_s']:,.2f}")]
        if "compile_speedup" in result:
            rows.append(("speed-up of torch.compile (cached step)", f"{result['compile_speedup']:.2f}x"))
    width = max(len(name) for name, _ in rows)
    print(f"train_student bench: {recipe.name}, batch {batch}, {device_name}, {store.attrs['target_format']} targets")
    print(f"| {'measure':<{width}} | samples/s |")
    print(f"|{'-' * (width + 2)}|-----------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value:>9} |")
    print(f"data feed: {result['feed_cpu_ms_per_sample']:.3f} ms of CPU time (all threads) per sample")
    if not args.feed_only:
        print(f"live-feed step time: {100 * result['data_wait_share']:.1f}% waiting for the next ready batch; "
              f"rendering a batch on its own costs {100 * result['render_share']:.1f}% of a staged step "
              f"(target <= 10%; overlapped with the step, it shows only in the cached / staged ratio)")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"figures written to {args.out}")
