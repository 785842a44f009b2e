"""Student training from cached teacher targets (or, as a baseline, from a teacher run at every step).

Reads top to bottom like nanoGPT's train.py: set up ranks and devices, check the inputs, build the
student, decoder, EMA and optimizer, restore a checkpoint if resuming, then loop over epochs and
micro-batches: render the views from their parameters on the training device, compute the loss terms
with `dpal.distill.distill_step_losses`, step AdamW, update the EMA, log, checkpoint. At the end:
a final checkpoint, the student and its EMA exported through `formats.exports.export_student`, and a
PNG of the loss curves.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dpal import dispatch
from dpal.config import OptimConfig, Recipe, token_counts
from dpal.decoder import DynamicPatternDecoder
from dpal.distill import distill_step_losses
from dpal.errors import UserError
from dpal.losses import moe_weight
from dpal.recipes import get_recipe
from dpal.shape_mask import fit_shape_mask, shape_mask
from dpal.students import build_student
from dpal.teachers import global_view_targets, teacher_targets
from dpal.views import render_local_crops, render_view_sets
from formats.cli import Interrupted, exit_status
from formats.exports import export_student
from formats.images import ImageFile, check_images, images_fingerprint
from formats.store import open_store
from formats.targets import Targets
from formats.view_records import online_calibration_view_params
import kernels
from train_student.checkpoint import (CHECKPOINT_NAME, claim_run_folder, load_checkpoint, rng_state, save_checkpoint,
                                      set_rng_state)
from train_student.data import BackgroundPool, CachedFeed, FeedBatch, FeedPlan, OnlineFeed
from train_student.metrics import LOSS_COLUMNS, LOSS_PLOT, METRICS_CSV, MetricsLog, plot_losses
from train_student.spec import TrainSpec

# Settings that may differ when a run is resumed (they do not change what is computed).
RESUMABLE_KEYS = {"max_steps", "checkpoint_every", "workers", "progress", "reference_path"}
# `distill_step_losses` keys in the metrics' column order (its "total" is the CSV's "loss").
TERM_KEYS = ("total",) + LOSS_COLUMNS[1:]


class TrainingError(UserError):
    """Training stopped for a reason the user must act on (message says what and what was kept)."""


class StopRequest:
    """SIGINT / SIGTERM during the training loop: remembered, and acted on at the next optimizer step
    boundary (all ranks agree through the step's all-reduce), where a checkpoint is written and the run
    stops; a second signal stops at once, without saving."""

    def __init__(self, describe_kept):
        self.signum: int | None = None
        self.describe_kept = describe_kept

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} again before the step "
                                      f"ended, without saving; {self.describe_kept()}")
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(send it again to stop at once without saving)", file=sys.stderr)


class Distiller(torch.nn.Module):
    """Student + decoder as one module, so DDP sees every trained parameter in one forward."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.teacher_spec = recipe.teacher
        self.student = build_student(recipe)
        self.decoder = DynamicPatternDecoder(recipe.decoder)

    def forward(self, views: dict, targets: dict, moe_loss_weight: float) -> dict[str, torch.Tensor]:
        return distill_step_losses(self.student, self.decoder, self.teacher_spec, **views, **targets,
                                   moe_loss_weight=moe_loss_weight)


def apply_overrides(recipe: Recipe, spec: TrainSpec) -> Recipe:
    """The recipe with the CLI's optimisation overrides (every unset flag keeps the recipe's value)."""
    optim = {"epochs": spec.epochs, "warmup_epochs": spec.warmup_epochs, "base_lr": spec.blr,
             "min_lr": spec.min_lr, "weight_decay": spec.weight_decay, "accum_steps": spec.accum_steps}
    optim = {key: value for key, value in optim.items() if value is not None}
    return dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, **optim))


def learning_rate(step: int, *, peak: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 (step i of W gets peak * i / W, as the original's lr_sched), then half-cosine
    to min_lr at total_steps (per iteration)."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def ema_momentum(step: int, *, start: float, end: float, total_steps: int) -> float:
    """Cosine from `start` at step 0 to `end` at the last step, per iteration over the whole run."""
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * min(step / max(1, total_steps), 1.0)))


# 1-D here but [1, 1, D] in the original (its `gate.moe_tokens`), so decayed like the other matrices (spec 7).
_DECAYED_VECTORS = ("gate_token",)


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every parameter of >= 2 dims (pos_embed, cls_token and decoder queries included) and
    on the decoder's gate token; biases and norm weights (1-D) exempt, as in the published recipe."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            decayed = param.ndim >= 2 or name.rsplit(".", 1)[-1] in _DECAYED_VECTORS
            (decay if decayed else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_update(optimizer: torch.optim.Optimizer, lr: float, student_params: list, ema_params: list,
                 momentum: float) -> None:
    """AdamW step at `lr`, then EMA <- momentum * EMA + (1 - momentum) * student."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, student_params, 1.0 - momentum)


def images_to_device(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Variable-size uint8 images to the device in one pinned, non-blocking copy."""
    if device.type != "cuda":
        return images
    staging = torch.empty(sum(image.numel() for image in images), dtype=torch.uint8, pin_memory=True)
    offset = 0
    for image in images:
        staging[offset:offset + image.numel()].copy_(image.reshape(-1))
        offset += image.numel()
    on_device = staging.to(device, non_blocking=True)
    out, offset = [], 0
    for image in images:
        out.append(on_device[offset:offset + image.numel()].view(image.shape))
        offset += image.numel()
    return out


def render_batch(batch: FeedBatch, recipe: Recipe, device: torch.device) -> dict[str, torch.Tensor]:
    """The views of one micro-batch, re-rendered on the training device from their parameters."""
    on_device = images_to_device(batch.images + batch.backgrounds, device)  # one staging copy for both
    images, backgrounds = on_device[:len(batch.images)], on_device[len(batch.images):]
    views = render_view_sets(images, backgrounds, batch.view_params, recipe.views, device=device)
    local_views = render_local_crops(images, batch.local_params, recipe.views, device=device)
    return {"global_view": views.global_view, "local_views": local_views, "crowd_view": views.crowd}


def cached_targets(batch: FeedBatch, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's stored targets as distill_step_losses arguments, copied to the device without blocking."""
    return batch.targets.to(device, non_blocking=True).loss_arguments()


def make_autocast(device: torch.device, optim: OptimConfig):
    """Autocast to the recipe's mixed-precision dtype on CUDA; none on the CPU, which trains in float32."""
    return torch.autocast("cuda", dtype=getattr(torch, optim.amp_dtype)) if device.type == "cuda" else nullcontext()


def fit_online_mask_calibration(teacher, images_path, backgrounds: BackgroundPool, recipe: Recipe,
                                device: torch.device, *, count: int, seed: int, batch: int):
    """Shape-mask calibration for the online baseline, fitted once on the teacher's global-view tokens of
    the first `count` images (fixed view sets), so that every rank and every resume uses the same one."""
    image_file = ImageFile(images_path)
    count = min(count, image_file.num_images)
    params = online_calibration_view_params(seed, count, len(backgrounds), recipe.views)
    tokens = []
    autocast = make_autocast(device, recipe.optim)
    for start in range(0, count, batch):
        chunk = params[start:start + batch]
        images = [torch.from_numpy(image_file.image(i)) for i in range(start, start + len(chunk))]
        views = render_view_sets(images, backgrounds.batch(chunk), chunk, recipe.views, device=device)
        with torch.no_grad(), autocast:
            tokens.append(global_view_targets(teacher, views.global_view)[1].cpu())
    return fit_shape_mask(torch.cat(tokens), token_counts(recipe.teacher, recipe.views)[0])


def batch_losses(model: torch.nn.Module, batch: FeedBatch, recipe: Recipe, device: torch.device, autocast,
                 moe_loss_weight: float, *, teacher=None, mask_calibration=None) -> dict[str, torch.Tensor]:
    """Render the micro-batch's views on the device, get its targets (from the store, or from the teacher
    when one is given: the online baseline), and compute every loss term through the model."""
    views = render_batch(batch, recipe, device)
    if teacher is None:
        targets = cached_targets(batch, device)
    else:
        with torch.no_grad(), autocast:
            out = teacher_targets(teacher, views["global_view"], views["crowd_view"])
        targets = Targets(global_target=out.global_, local_target=out.local, relation_target=out.relation,
                          local_mask=shape_mask(out.local.float(), mask_calibration)).loss_arguments()
    with autocast:
        return model(views, targets, moe_loss_weight)


def build_distiller(recipe: Recipe, device: torch.device, lr: float):
    """(Distiller on the device, its student's EMA copy, AdamW over the spec's parameter groups)."""
    model = Distiller(recipe).to(device)
    ema_student = copy.deepcopy(model.student).requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, recipe.optim.weight_decay), lr=lr, betas=recipe.optim.betas,
                                  fused=device.type == "cuda")
    return model, ema_student, optimizer


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the torchrun process group when launched by it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA device is visible")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world_size, device


def run_record(spec: TrainSpec, recipe: Recipe, global_batch: int, images_fingerprint: str,
               store_identity: dict | None) -> dict:
    """What defines a run: the spec with what its inputs resolved (recorded in RUN_DIR/run.json; a resume must
    match it, except RESUMABLE_KEYS)."""
    online = spec.teacher_online
    return {"recipe": recipe.name, "optim": dataclasses.asdict(recipe.optim), "global_batch": global_batch,
            "seed": spec.seed, "window_images": spec.window_images, "lr": spec.lr,
            "images": str(Path(spec.images).resolve()), "images_fingerprint": images_fingerprint,
            "backgrounds": str(Path(spec.backgrounds).resolve()),
            "store": None if online else str(Path(spec.store).resolve()), "store_identity": store_identity,
            "teacher_online": online, "calibration_images": spec.calibration_images,
            "teacher_weights": str(Path(spec.teacher_weights).resolve()) if online else None,
            "teacher_options": spec.teacher_options if online else None,
            "max_steps": spec.max_steps, "checkpoint_every": spec.checkpoint_every, "workers": spec.workers,
            "progress": spec.progress, "reference_path": spec.reference_path}


def train(spec: TrainSpec) -> Path:
    with ExitStack() as held:  # the run folder's writer lock, from the folder's check to the end of the run
        return _train(spec, held)


def _train(spec: TrainSpec, held: ExitStack) -> Path:
    # ---------------------------------------------------------------- ranks, device, recipe
    rank, world_size, device = setup_distributed(spec.device)
    master = rank == 0
    recipe = apply_overrides(get_recipe(spec.recipe), spec)
    optim = recipe.optim
    kernels.register()  # the fused ops for CUDA tensors
    if spec.reference_path:
        dispatch.force_reference(True)
    if spec.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    global_batch = spec.batch_size or optim.batch_per_gpu * world_size * optim.accum_steps
    if global_batch % (world_size * optim.accum_steps):
        raise TrainingError(f"--batch-size {global_batch} is not divisible by {world_size} ranks x "
                            f"{optim.accum_steps} accumulation steps; choose a multiple of "
                            f"{world_size * optim.accum_steps}")
    micro_batch = global_batch // (world_size * optim.accum_steps)

    # ---------------------------------------------------------------- inputs (all checked before writing)
    fingerprint = images_fingerprint(spec.images)
    for path in (spec.images, spec.backgrounds):  # every image against its CRC32C from `pack` (README: cost)
        check_images(path, progress=master and spec.progress)
    backgrounds = BackgroundPool(spec.backgrounds)
    teacher = store = store_identity = None
    if spec.teacher_online:
        from dpal.teachers import load_teacher
        if not spec.teacher_weights:
            raise TrainingError("--teacher-online needs --teacher-weights W.pth (the teacher's released checkpoint)")
        teacher = load_teacher(recipe.teacher.name, spec.teacher_weights, **spec.teacher_options).to(device)
        num_images, chunk_images = ImageFile(spec.images).num_images, 1
    else:
        store = open_store(spec.store)
        store.check_compatible(recipe, recipe.views, fingerprint, images_fingerprint(spec.backgrounds))
        num_images, chunk_images = store.num_images, store.chunk_images
        # The run is bound to this exact store: its unique id, seed, image count, ... (all but file locations).
        store_identity = {key: value for key, value in store.attrs.items() if not key.endswith("_path")}
    plan = FeedPlan(num_images=num_images, chunk_images=chunk_images, micro_batch=micro_batch,
                    world_size=world_size, rank=rank, accum_steps=optim.accum_steps, seed=spec.seed,
                    window_images=spec.window_images)
    if plan.steps_per_epoch < 1:
        raise TrainingError(f"global batch {global_batch} is larger than the {num_images} images of "
                            f"{spec.images}; use a smaller --batch-size")
    total_steps = optim.epochs * plan.steps_per_epoch
    warmup_steps = optim.warmup_epochs * plan.steps_per_epoch
    last_step = total_steps if spec.max_steps is None else min(total_steps, spec.max_steps)
    peak_lr = spec.lr if spec.lr is not None else optim.peak_lr(global_batch)

    run_dir = Path(spec.out)
    config = run_record(spec, recipe, global_batch, fingerprint, store_identity)
    # Rank 0 locks the folder (a second process or job is refused), then checks and prepares it.
    held.enter_context(claim_run_folder(run_dir, config, resume=spec.resume, resumable_keys=RESUMABLE_KEYS))

    # ---------------------------------------------------------------- model, EMA, optimizer
    torch.manual_seed(spec.seed)  # identical init everywhere (DDP also broadcasts rank 0's weights)
    model, ema_student, optimizer = build_distiller(recipe, device, peak_lr)
    step = 0
    if spec.resume:
        state = load_checkpoint(run_dir)
        model.student.load_state_dict(state["student"])
        model.decoder.load_state_dict(state["decoder"])
        ema_student.load_state_dict(state["student_ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        rng_states = state["rng"]
        if len(rng_states) == world_size:
            set_rng_state(rng_states[rank], device)
        else:
            torch.manual_seed(spec.seed + 1000 * step + rank)
    else:
        torch.manual_seed(spec.seed + 1 + rank)  # per-rank stream for drop-path draws
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else model
    autocast = make_autocast(device, optim)
    student_params, ema_params = list(model.student.parameters()), list(ema_student.parameters())
    trained_params = list(model.parameters())

    # ---------------------------------------------------------------- data feed
    pin = device.type == "cuda"
    if spec.teacher_online:
        feed = OnlineFeed(spec.images, backgrounds, plan, recipe.views, workers=spec.workers)
        mask_calibration = fit_online_mask_calibration(teacher, spec.images, backgrounds, recipe, device,
                                                       count=spec.calibration_images, seed=spec.seed,
                                                       batch=micro_batch)
    else:
        mask_calibration = None
        feed = CachedFeed(spec.images, store, backgrounds, plan, recipe.views, workers=spec.workers, pin=pin)

    def checkpoint_state() -> dict:
        rng_states = [rng_state(device)]
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        return {"recipe": recipe.name, "step": step, "student": model.student.state_dict(),
                "decoder": model.decoder.state_dict(), "student_ema": ema_student.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": rng_states}

    saved_step = step if spec.resume else None

    def kept() -> str:
        return (f"the last checkpoint {run_dir / CHECKPOINT_NAME} (step {saved_step}) is kept"
                if saved_step is not None else "no checkpoint had been written yet, nothing of the run is kept")

    stop = StopRequest(kept)  # from here on a signal stops at a step boundary, with a checkpoint
    stop.install()
    log = MetricsLog(run_dir, resume_step=step if spec.resume else None) if master else None
    progress = None
    if master and spec.progress:
        from tqdm import tqdm
        progress = tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True,
                        desc=f"{recipe.name} (global batch {global_batch})")

    # ---------------------------------------------------------------- training loop
    ddp_model.train()
    epoch, start_micro = divmod(step, plan.steps_per_epoch)
    start_micro *= optim.accum_steps
    step_start, data_wait = time.perf_counter(), 0.0
    sums = None
    micro_in_step = 0
    try:
        while step < last_step:
            moe_loss_weight = moe_weight(epoch, optim)
            batches = iter(feed.epoch(epoch, start_micro))
            while step < last_step:
                wait_start = time.perf_counter()
                batch = next(batches, None)
                data_wait += time.perf_counter() - wait_start
                if batch is None:
                    break
                micro_in_step += 1
                last_micro = micro_in_step == optim.accum_steps
                sync = nullcontext() if last_micro or world_size == 1 else ddp_model.no_sync()
                with sync:
                    terms = batch_losses(ddp_model, batch, recipe, device, autocast, moe_loss_weight,
                                         teacher=teacher, mask_calibration=mask_calibration)
                    (terms["total"] / optim.accum_steps).backward()
                detached = torch.stack([terms[key].detach().float() for key in TERM_KEYS])
                sums = detached if sums is None else sums + detached
                if not last_micro:
                    continue

                # one optimizer step; the stop vote rides on the loss all-reduce: > 0 if any rank was signalled
                stop_vote = torch.tensor([float(stop.signum is not None)], device=sums.device)
                means = torch.cat([sums / optim.accum_steps, stop_vote])
                if world_size > 1:
                    dist.all_reduce(means, op=dist.ReduceOp.AVG)
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trained_params if p.grad is not None])
                *values, stop_vote, grad_norm = torch.cat([means, grad_norm.reshape(1).float()]).tolist()  # one sync
                if not all(math.isfinite(v) for v in values + [grad_norm]):
                    raise TrainingError(f"loss or gradient is not finite at step {step + 1} (epoch {epoch}): "
                                        f"total={values[0]}, terms global={values[1]} local={values[2]} "
                                        f"relation={values[3]} moe={values[4]} experts={values[5]}, "
                                        f"grad norm={grad_norm}; training stopped, {kept()}. Check the store's "
                                        f"targets and the learning rate.")
                lr = learning_rate(step, peak=peak_lr, min_lr=optim.min_lr, warmup_steps=warmup_steps,
                                   total_steps=total_steps)
                momentum = ema_momentum(step, start=optim.ema_momentum[0], end=optim.ema_momentum[1],
                                        total_steps=total_steps)
                apply_update(optimizer, lr, student_params, ema_params, momentum)
                step += 1
                now = time.perf_counter()
                elapsed = now - step_start
                if log is not None:
                    log.log({"step": step, "epoch": epoch, **dict(zip(LOSS_COLUMNS, values)),
                             "lr": lr, "ema_momentum": momentum, "moe_weight": moe_loss_weight,
                             "grad_norm": grad_norm, "samples_per_s": global_batch / elapsed,
                             "data_wait_share": data_wait / elapsed})
                if progress is not None:
                    progress.set_postfix(loss=f"{values[0]:.4f}", lr=f"{lr:.2e}",
                                         samples_s=f"{global_batch / elapsed:.1f}", refresh=False)
                    progress.update(1)
                step_start, data_wait, sums, micro_in_step = now, 0.0, None, 0
                stopping = stop_vote > 0 and step < last_step
                if stopping or (spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < last_step):
                    state = checkpoint_state()
                    if master:
                        save_checkpoint(run_dir, state)
                    saved_step = step
                if stopping:
                    if world_size > 1:  # no rank exits (making torchrun stop the others) before the save is done
                        dist.barrier()
                        dist.destroy_process_group()
                    signum = stop.signum or signal.SIGTERM  # a rank that was not signalled itself follows the others
                    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint "
                                              f"{run_dir / CHECKPOINT_NAME} written: continue with the same command "
                                              f"and --resume")
            batches.close()
            epoch, start_micro = epoch + 1, 0
    finally:
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()

    # ---------------------------------------------------------------- end: checkpoint, exports, plot
    state = checkpoint_state()
    if master:
        save_checkpoint(run_dir, state)
        extra = {"recipe": recipe.name, "step": step, "global_batch": global_batch}
        export_student(model.student, run_dir / "student", extra=extra)
        export_student(ema_student, run_dir / "student_ema", extra={**extra, "ema": True})
        plot_losses(run_dir / METRICS_CSV, run_dir / LOSS_PLOT)
        print(f"finished {step} steps; run folder {run_dir}: {CHECKPOINT_NAME}, student.*, student_ema.* (timm exports), "
              f"{METRICS_CSV}, {LOSS_PLOT}, tensorboard/")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def default_workers(device_arg: str) -> int:
    """FFCV decoding threads per rank: the cores left per rank on GPU machines, 1 when training on the CPU.

    Training on the CPU needs its cores for the model: FFCV's decoding threads competing with torch's
    made steps several times slower on a 2-core machine, and one decoding thread keeps up there."""
    if device_arg == "cpu" or (device_arg == "auto" and not torch.cuda.is_available()):
        return 1
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def run_training(spec: TrainSpec) -> int:
    """CLI entry: train; errors and signals become one line and an exit status (`exit_status`). A fresh run
    that fails or is stopped before its first checkpoint leaves no run folder behind (nothing of it is
    worth keeping, and a leftover run.json would refuse the corrected command)."""
    run_dir = Path(spec.out)
    fresh = not spec.resume and int(os.environ.get("RANK", "0")) == 0 and not (run_dir.is_dir() and
                                                                                 any(run_dir.iterdir()))
    existed = run_dir.exists()
    status = exit_status(lambda: train(spec) and 0,  # train returns the run folder
                         stop_message=" before training started; nothing was trained")
    if status != 0 and fresh and run_dir.is_dir() and not (run_dir / CHECKPOINT_NAME).exists():
        if existed:
            for entry in run_dir.iterdir():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        else:
            shutil.rmtree(run_dir)
    return status

