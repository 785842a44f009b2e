"""Student training from cached teacher targets (or, as a baseline, from a teacher run at every step).

Reads top to bottom like nanoGPT's train.py: set up ranks and devices, check the inputs, build the
student, decoder, EMA and optimizer, restore a checkpoint if resuming, then loop over epochs and
micro-batches: the views of the next micro-batch are rendered from their parameters on the training
device while this one computes (`prefetch.render_ahead`), the step (`step.py`: loss terms through
`dpal.distill.distill_step_losses` with targets from the store or the online teacher, AdamW, EMA) runs,
and the step before's values are read, checked and logged; checkpoints as asked. At the end: a final
checkpoint, the student and its EMA exported (`train_student.export.write_exports`; also every --export-every
steps), and a PNG of the loss curves.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dpal import dispatch
from dpal.config import Recipe
from dpal.losses import LossTerms, moe_weight
from dpal.pairs import resolve_recipe
from dpal.recipes import RECIPES
from dpal.views import STALE_VIEW_RECORDS, VIEW_PARAMS_VERSION
from formats.images import ImageFile, check_images, images_fingerprint
from formats.run_spec import spec_dict
from formats.store import StoreError, file_sha256, integrity_problems, open_store, repair_hint
from formats.teacher_side import BackgroundPool
from formats.view_records import describe_view_set_reuse
import kernels
from runtime.ahead import HostCopy
from runtime.cli import Interrupted, exit_status, note_adjusted, setup_logging
from runtime.distributed import setup_distributed
from train_student.checkpoint import (CHECKPOINT_NAME, RUN_CONFIG_NAME, claim_run_folder, keep_step_copy,
                                      load_checkpoint, recorded_compute_threads, recorded_run_id, rng_state,
                                      save_checkpoint, set_rng_state)
from train_student.data import CachedFeed, FeedPlan, OnlineFeed, compute_threads
from train_student.export import write_exports
from train_student.metrics import LOSS_PLOT, METRICS_CSV, MetricsLog, plot_losses
from train_student.prefetch import render_ahead
from train_student.spec import TrainSpec
from train_student.step import (CachedTargets, OnlineTeacher, TrainingError, build_distiller, forward_backward,
                                make_autocast, optimizer_step)
from train_student.validation import (Validation, online_teacher, open_validation_store, store_teacher,
                                      validation_record)

LOG = logging.getLogger("dpal.train")
# Plain log lines per run when there is no progress bar (not a terminal, or --no-progress).
LOG_LINES_PER_RUN = 50

# Settings that may differ when a run is resumed: they do not change what is computed (--workers sets FFCV's
# decoding threads only, `runtime.startup.startup`; torch's threads are the recorded compute_threads).
RESUMABLE_KEYS = {"max_steps", "checkpoint_every", "check_store", "keep_checkpoints", "export_every", "export_program",
                  "workers", "progress", "val_every"}
# Settings that change the arithmetic: a resume that changes one is refused, naming it and how to get the
# recorded value back, unless --inexact-resume (recorded in run.json). Key -> that remedy.
INEXACT_KEYS = {"compile": "pass --compile or --no-compile as recorded",
                "fused_kernels": "pass --reference-path as recorded (fused kernels: True is without it, on CUDA)",
                "device": "resume on the recorded --device",
                "deterministic": "pass --deterministic as recorded",
                "ranks": "launch as many ranks as recorded (torchrun --nnodes x --nproc_per_node)"}


class StopRequest:
    """SIGINT / SIGTERM during the training loop: remembered, and acted on at the next optimizer step
    boundary (all ranks agree through a host-side vote there), where a checkpoint is written and the run
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


class StepValues(NamedTuple):
    """An optimizer step whose values are still on their way from the device, with its host-side figures."""
    step: int
    epoch: int
    lr: float
    momentum: float
    moe_weight: float
    seconds: float  # host time of the step
    data_wait: float  # of which waiting for the next ready batch
    values: HostCopy  # [loss terms..., grad norm], on its way from the device


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


def run_record(spec: TrainSpec, recipe: Recipe, global_batch: int, images_fingerprint: str,
               store_identity: dict | None, validation: dict | None, *, device: torch.device, ranks: int,
               threads: int) -> dict:
    """What defines a run: the spec with what its inputs and machine resolved (recorded in RUN_DIR/run.json; a
    resume must match it, except RESUMABLE_KEYS, and INEXACT_KEYS with --inexact-resume)."""
    online = spec.teacher_online
    return {"recipe": recipe.name, "optim": dataclasses.asdict(recipe.optim), "global_batch": global_batch,
            "seed": spec.seed, "window_images": spec.window_images, "lr": spec.lr,
            "images": str(Path(spec.images).resolve()), "images_fingerprint": images_fingerprint,
            "backgrounds": str(Path(spec.backgrounds).resolve()),
            "store": None if online else str(Path(spec.store).resolve()), "store_identity": store_identity,
            "teacher_online": online, "calibration_images": spec.calibration_images,
            "teacher_weights": str(Path(spec.teacher_weights).resolve()) if online else None,
            "teacher_options": spec.teacher_options if online else None,
            "max_steps": spec.max_steps, "checkpoint_every": spec.checkpoint_every,
            "keep_checkpoints": spec.keep_checkpoints, "export_every": spec.export_every,
            "export_program": spec.export_program, "check_store": spec.check_store, "workers": spec.workers,
            "progress": spec.progress, "compile": spec.compile, "device": device.type, "ranks": ranks,
            "deterministic": spec.deterministic, "compute_threads": threads,
            "fused_kernels": device.type == "cuda" and not spec.reference_path,
            "view_params_version": VIEW_PARAMS_VERSION, "validation": validation, "val_every": spec.val_every,
            **models_record(spec, recipe)}


def models_record(spec: TrainSpec, recipe: Recipe) -> dict:
    """What a run of a composed recipe (--teacher with --student) really used, for run.json: the teacher and
    student descriptions (timm name, width, stride, ...), and the initial student weights' and the online
    teacher's files with their SHA-256. A published recipe's name says it all, so its run.json stays as it was."""
    record = {}
    if recipe.name not in RECIPES:
        record.update(teacher_spec=spec_dict(recipe.teacher), student_spec=spec_dict(recipe.student))
        if spec.teacher_online:
            record["teacher_weights_sha256"] = file_sha256(spec.teacher_weights)
    if spec.student_weights is not None:
        record.update(student_weights=str(Path(spec.student_weights).resolve()),
                      student_weights_sha256=file_sha256(spec.student_weights))
    return record


def check_view_records_of_run(run_dir: Path) -> None:
    """Refuse to resume a run whose views were drawn as another version of view records (a run recorded before
    the version was recorded drew version 1): its weights were trained on views of another rule."""
    try:
        recorded = json.loads((run_dir / RUN_CONFIG_NAME).read_text()).get("view_params_version", 1)
    except (OSError, ValueError, AttributeError):
        return  # no readable run record: claim_run_folder refuses the resume with its own message
    if recorded != VIEW_PARAMS_VERSION:
        why = STALE_VIEW_RECORDS.get(recorded, "another rule")
        raise TrainingError(f"--resume: the run in {run_dir} drew its views as view records v{recorded} ({why}); "
                            f"this code draws v{VIEW_PARAMS_VERSION} and cannot continue it: start a new run in "
                            f"another folder (its store, if any, rebuilt with `python -m cache_teacher run`)")


def train(spec: TrainSpec) -> Path:
    with ExitStack() as held:  # the run folder's writer lock, from the folder's check to the end of the run
        return _train(spec, held)


def _train(spec: TrainSpec, held: ExitStack) -> Path:
    # ---------------------------------------------------------------- ranks, device, recipe
    rank, world_size, device = setup_distributed(spec.device)
    master = rank == 0
    recipe = apply_overrides(resolve_recipe(spec.recipe), spec)
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
        check_images(path, progress=master and spec.progress and sys.stderr.isatty())
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
        if spec.check_store:  # every shard file against its CRC32C now, not in the epoch that first reads it
            if problems := integrity_problems(store):
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise StoreError(f"--check-store: {problems[0]}{more}; {repair_hint(store.path)}")
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
    if master:
        print(describe_view_set_reuse(optim.epochs, store.views_per_image) if store is not None else
              "online teacher: every view set is new (used once)")
    validation = None
    if spec.val_store:
        val_images = spec.val_images or spec.images
        teacher_identity = store_teacher(store.attrs) if store is not None else \
            online_teacher(spec.teacher_weights, spec.teacher_options, device)
        val_store = open_validation_store(spec.val_store, recipe=recipe, images=val_images,
                                          backgrounds=spec.backgrounds, teacher=teacher_identity,
                                          training_images_fingerprint=fingerprint,
                                          training_store_seed=None if store is None else store.attrs["seed"])
        validation = Validation(val_store, val_images, backgrounds, recipe, device)
    total_steps = optim.epochs * plan.steps_per_epoch
    warmup_steps = optim.warmup_epochs * plan.steps_per_epoch
    last_step = total_steps if spec.max_steps is None else min(total_steps, spec.max_steps)
    if spec.max_steps is not None:
        note_adjusted("--max-steps", spec.max_steps, last_step, f"the schedule has {total_steps} steps in all")
    peak_lr = spec.lr if spec.lr is not None else optim.peak_lr(global_batch)

    run_dir = Path(spec.out)
    if spec.resume:
        check_view_records_of_run(run_dir)
    threads = compute_threads(recorded_compute_threads(run_dir) if spec.resume else None)
    torch.set_num_threads(threads)
    config = run_record(spec, recipe, global_batch, fingerprint, store_identity,
                        None if validation is None else validation_record(validation.store, val_images),
                        device=device, ranks=world_size, threads=threads)
    # Rank 0 locks the folder (a second process or job is refused), then checks and prepares it.
    held.enter_context(claim_run_folder(run_dir, config, resume=spec.resume, resumable_keys=RESUMABLE_KEYS,
                                        inexact_keys=INEXACT_KEYS, inexact=spec.inexact_resume))
    run_id = recorded_run_id(run_dir)

    # ---------------------------------------------------------------- model, EMA, optimizer
    torch.manual_seed(spec.seed)  # identical init everywhere (DDP also broadcasts rank 0's weights)
    model, ema_student, optimizer = build_distiller(recipe, device, peak_lr, compile_model=spec.compile,
                                                    student_weights=None if spec.resume else spec.student_weights)
    step = 0
    if spec.resume:
        state = load_checkpoint(run_dir, run_id)
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

    # ---------------------------------------------------------------- data feed, target source
    pin = device.type == "cuda"
    if spec.teacher_online:
        feed = OnlineFeed(spec.images, backgrounds, plan, recipe.views, workers=spec.workers)
        source = OnlineTeacher.calibrated(teacher, spec.images, backgrounds, recipe.views, device,
                                          count=spec.calibration_images, seed=spec.seed, batch=micro_batch)
    else:
        feed = CachedFeed(spec.images, store, backgrounds, plan, recipe.views, workers=spec.workers, pin=pin)
        source = CachedTargets()

    def checkpoint_state() -> dict:
        rng_states = [rng_state(device)]
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        return {"recipe": recipe.name, "step": step, "moe_weight": moe_weight(step_epoch(step), optim),
                "student": model.student.state_dict(),
                "decoder": model.decoder.state_dict(), "student_ema": ema_student.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": rng_states}

    saved_step = step if spec.resume else None

    def export(student, ema) -> None:
        write_exports(run_dir, student, ema, step=step, recipe=recipe.name, global_batch=global_batch,
                      program=spec.export_program)

    def kept() -> str:
        return (f"the last checkpoint {run_dir / CHECKPOINT_NAME} (step {saved_step}) is kept"
                if saved_step is not None else "no checkpoint had been written yet, nothing of the run is kept")

    def step_epoch(done_steps: int) -> int:
        """The epoch of the last of `done_steps` optimizer steps."""
        return max(0, done_steps - 1) // plan.steps_per_epoch

    def validate() -> None:
        """Evaluate on the validation store after `step` steps and log it (rank 0; the others go on)."""
        if validation is None or log is None:
            return
        terms = validation.mean(model.student, model.decoder, autocast=autocast,
                                moe_loss_weight=moe_weight(step_epoch(step), optim))
        log.log_validation({"step": step, "epoch": step_epoch(step), **terms})

    stop = StopRequest(kept)  # from here on a signal stops at a step boundary, with a checkpoint
    stop.install()
    log = MetricsLog(run_dir, resume_step=step if spec.resume else None,
                     validation=validation is not None) if master else None
    if master:
        def millions(module) -> str:
            return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"

        source_text = (f"online teacher {spec.teacher_weights}" if spec.teacher_online else
                       f"store {spec.store} (K={store.attrs.get('views_per_image')} view sets per image)")
        LOG.info(f"{'resuming at step ' + str(step) if spec.resume else 'starting'}: recipe {recipe.name} on "
                 f"{world_size} x {device}; parameters: student {millions(model.student)}, decoder "
                 f"{millions(model.decoder)}, EMA {millions(ema_student)}; {num_images} images, {source_text}; "
                 f"global batch {global_batch} ({world_size} ranks x {optim.accum_steps} accumulation x "
                 f"{micro_batch}); {plan.steps_per_epoch} steps per epoch x {optim.epochs} epochs = {total_steps} "
                 f"steps, running to {last_step}; peak lr {peak_lr:.3g} after {warmup_steps} warm-up steps; "
                 f"run folder {run_dir}")
    plain_every = max(1, last_step // LOG_LINES_PER_RUN)
    progress = None
    if master and spec.progress and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True,
                        desc=f"{recipe.name} (global batch {global_batch})")

    # ---------------------------------------------------------------- training loop
    # The host reads a step's values (loss terms, grad norm) one step late, once the next step is queued
    # behind them, so the device queue never runs dry; a checkpoint first settles the step it saves.
    pending: StepValues | None = None

    def settle() -> None:
        """Read the pending step's values: stop the run if they are not finite, else log them."""
        nonlocal pending
        if pending is None:
            return
        done, pending = pending, None
        *values, grad_norm = done.values.wait().tolist()
        terms = LossTerms(*values)
        if not all(math.isfinite(v) for v in values + [grad_norm]):
            named = ", ".join(f"{name}={value}" for name, value in terms.by_name().items())
            raise TrainingError(f"loss or gradient is not finite at step {done.step} (epoch {done.epoch}): "
                                f"{named}, grad norm={grad_norm}; training stopped, {kept()}. Check the store's "
                                f"targets and the learning rate.")
        if log is not None:
            log.log({"step": done.step, "epoch": done.epoch, **terms.by_name(),
                     "lr": done.lr, "ema_momentum": done.momentum, "moe_weight": done.moe_weight,
                     "grad_norm": grad_norm, "samples_per_s": global_batch / done.seconds,
                     "data_wait_share": done.data_wait / done.seconds})
        if progress is not None:
            progress.set_postfix(loss=f"{terms.total:.4f}", lr=f"{done.lr:.2e}",
                                 samples_s=f"{global_batch / done.seconds:.1f}", refresh=False)
            progress.update(1)
        elif master and (done.step % plain_every == 0 or done.step == last_step):
            LOG.info(f"step {done.step}/{last_step} epoch {done.epoch}: loss {terms.total:.4f} lr {done.lr:.3g} "
                     f"grad norm {grad_norm:.3g} {global_batch / done.seconds:.1f} samples/s")

    # The stop vote is a host-side all-reduce (gloo) at every step boundary: ranks agree without a device sync.
    stop_group = dist.new_group(backend="gloo") if world_size > 1 and device.type == "cuda" else None

    def stop_voted() -> bool:
        """Whether any rank was signalled."""
        vote = torch.tensor([float(stop.signum is not None)])
        if world_size > 1:
            dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=stop_group)
        return bool(vote.item() > 0)

    ddp_model.train()
    epoch, start_micro = divmod(step, plan.steps_per_epoch)
    start_micro *= optim.accum_steps
    step_start, data_wait = time.perf_counter(), 0.0
    sums = None
    micro_in_step = 0
    batches = None
    try:
        while step < last_step:
            moe_loss_weight = moe_weight(epoch, optim)
            # views of micro-batch N+1 are rendered (and its targets staged) while N computes
            batches = render_ahead(feed.epoch(epoch, start_micro), recipe.views, device, source)
            while step < last_step:
                wait_start = time.perf_counter()
                ready = next(batches, None)
                data_wait += time.perf_counter() - wait_start
                if ready is None:
                    break
                micro_in_step += 1
                last_micro = micro_in_step == optim.accum_steps
                sync = nullcontext() if last_micro or world_size == 1 else ddp_model.no_sync()
                with sync:
                    terms = forward_backward(ddp_model, ready, source, autocast, moe_loss_weight, optim.accum_steps)
                sums = terms if sums is None else sums + terms
                if not last_micro:
                    continue

                lr = learning_rate(step, peak=peak_lr, min_lr=optim.min_lr, warmup_steps=warmup_steps,
                                   total_steps=total_steps)
                momentum = ema_momentum(step, start=optim.ema_momentum[0], end=optim.ema_momentum[1],
                                        total_steps=total_steps)
                values = optimizer_step(optimizer, trained_params, student_params, ema_params, sums,
                                        accum_steps=optim.accum_steps, lr=lr, momentum=momentum,
                                        world_size=world_size)
                step += 1
                now = time.perf_counter()
                settle()  # the step before this one
                pending = StepValues(step, epoch, lr, momentum, moe_loss_weight, now - step_start, data_wait, values)
                step_start, data_wait, sums, micro_in_step = now, 0.0, None, 0
                stopping = stop_voted() and step < last_step
                if spec.val_every and step % spec.val_every == 0 and step < last_step:
                    validate()  # before the checkpoint: a resume from it never misses this row
                if stopping or (spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < last_step):
                    settle()  # no checkpoint after a step whose values were not checked
                    state = checkpoint_state()
                    if master:
                        save_checkpoint(run_dir, state, run_id)
                        keep_step_copy(run_dir, step, spec.keep_checkpoints)
                    saved_step = step
                if master and spec.export_every and step % spec.export_every == 0 and step < last_step:
                    settle()  # exports only of checked steps
                    export(model.student, ema_student)
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
        settle()
        validate()
    finally:
        if batches is not None:
            batches.close()
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()

    # ---------------------------------------------------------------- end: checkpoint, exports, plot
    state = checkpoint_state()
    if master:
        save_checkpoint(run_dir, state, run_id)
        keep_step_copy(run_dir, step, spec.keep_checkpoints)
        export(model.student, ema_student)
        plot_losses(run_dir / METRICS_CSV, run_dir / LOSS_PLOT)
        LOG.info(f"finished {step} steps; run folder {run_dir}: {CHECKPOINT_NAME}, student/, student_ema/ (timm exports), "
              f"{METRICS_CSV}, {LOSS_PLOT}, tensorboard/")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def run_training(spec: TrainSpec) -> int:
    """CLI entry: train; errors and signals become one line and an exit status (`exit_status`). A fresh run
    that fails or is stopped before its first checkpoint leaves no run folder behind (nothing of it is
    worth keeping, and a leftover run.json would refuse the corrected command)."""
    run_dir = Path(spec.out)
    fresh = not spec.resume and int(os.environ.get("RANK", "0")) == 0 and not (run_dir.is_dir() and
                                                                                 any(run_dir.iterdir()))
    existed = run_dir.exists()
    setup_logging()
    status = exit_status(lambda: train(spec) and 0,  # train returns the run folder
                         stop_message=" before training started; nothing was trained")
    if status != 0 and fresh and run_dir.is_dir() and not (run_dir / CHECKPOINT_NAME).exists():
        if existed:
            for entry in run_dir.iterdir():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        else:
            shutil.rmtree(run_dir)
    return status

