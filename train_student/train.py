"""Student training from cached teacher targets (or, as a baseline, from a teacher run at every step).

Reads top to bottom like nanoGPT's train.py: `_train` sets up ranks and devices, checks the inputs, claims
the run folder, builds the student, decoder, EMA and optimizer (restoring a checkpoint if resuming), opens
the data feed and the target source, then runs `loop.run_steps`: the views of the next micro-batch are
rendered from their parameters on the training device while this one computes (`prefetch.render_ahead`),
the step (`step.py`: loss terms through `dpal.distill.distill_step_losses` with targets from the store or
the online teacher, AdamW, EMA) runs, and the step before's values are read, checked and logged
(`loop.StepLog`); validation, checkpoints and exports as asked (`loop.RunFolder`). At the end: a final
checkpoint, the student and its EMA exported (`train_student.export.write_exports`), and a PNG of the loss
curves.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from dpal import dispatch
from dpal.config import OptimConfig, Recipe
from dpal.pairs import resolve_recipe
from dpal.recipes import RECIPES
from dpal.views import STALE_VIEW_RECORDS, VIEW_PARAMS_VERSION
from formats.images import ImageFile, check_images, images_fingerprint
from formats.run_spec import spec_dict
from formats.store import StoreError, TargetStore, file_sha256, integrity_problems, open_store, repair_hint
from formats.teacher_side import BackgroundPool
from formats.view_records import describe_view_set_reuse
import kernels
from runtime.cli import exit_status, note_adjusted, setup_logging
from runtime.distributed import setup_distributed
from train_student.checkpoint import (CHECKPOINT_NAME, RUN_CONFIG_NAME, claim_run_folder, load_checkpoint,
                                      recorded_compute_threads, recorded_run_id, set_rng_state)
from train_student.data import CachedFeed, FeedPlan, OnlineFeed, compute_threads
from train_student.loop import RunFolder, Schedule, StepLog, StopRequest, Trainer, rendered_ahead, run_steps
from train_student.metrics import MetricsLog
from train_student.spec import TrainSpec
from train_student.step import CachedTargets, OnlineTeacher, TrainingError, build_distiller, make_autocast
from train_student.validation import (Validation, online_teacher, open_validation_store, store_teacher,
                                      validation_record)

LOG = logging.getLogger("dpal.train")

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


def apply_overrides(recipe: Recipe, spec: TrainSpec) -> Recipe:
    """The recipe with the CLI's optimisation overrides (every unset flag keeps the recipe's value)."""
    optim = {"epochs": spec.epochs, "warmup_epochs": spec.warmup_epochs, "base_lr": spec.blr,
             "min_lr": spec.min_lr, "weight_decay": spec.weight_decay, "accum_steps": spec.accum_steps}
    optim = {key: value for key, value in optim.items() if value is not None}
    return dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, **optim))


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


class Inputs(NamedTuple):
    """The run's checked inputs: the images file's fingerprint, the background pool, and the target store
    (with its identity, all but file locations) or the online teacher."""
    fingerprint: str
    backgrounds: BackgroundPool
    store: TargetStore | None
    store_identity: dict | None
    teacher: torch.nn.Module | None
    num_images: int
    chunk_images: int


def set_up_process(spec: TrainSpec) -> tuple[int, int, torch.device]:
    """(rank, world_size, device), with the kernels, the reference path and determinism as asked."""
    rank, world_size, device = setup_distributed(spec.device)
    kernels.register()  # the fused ops for CUDA tensors
    if spec.reference_path:
        dispatch.force_reference(True)
    if spec.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return rank, world_size, device


def global_batch_size(spec: TrainSpec, optim: OptimConfig, world_size: int) -> int:
    global_batch = spec.batch_size or optim.batch_per_gpu * world_size * optim.accum_steps
    if global_batch % (world_size * optim.accum_steps):
        raise TrainingError(f"--batch-size {global_batch} is not divisible by {world_size} ranks x "
                            f"{optim.accum_steps} accumulation steps; choose a multiple of "
                            f"{world_size * optim.accum_steps}")
    return global_batch


def open_inputs(spec: TrainSpec, recipe: Recipe, device: torch.device, master: bool) -> Inputs:
    fingerprint = images_fingerprint(spec.images)
    for path in (spec.images, spec.backgrounds):  # every image against its CRC32C from `pack` (README: cost)
        check_images(path, progress=master and spec.progress and sys.stderr.isatty())
    backgrounds = BackgroundPool(spec.backgrounds)
    if spec.teacher_online:
        from dpal.teachers import load_teacher
        if not spec.teacher_weights:
            raise TrainingError("--teacher-online needs --teacher-weights W.pth (the teacher's released checkpoint)")
        teacher = load_teacher(recipe.teacher.name, spec.teacher_weights, **spec.teacher_options).to(device)
        return Inputs(fingerprint, backgrounds, None, None, teacher, ImageFile(spec.images).num_images, 1)
    store = open_store(spec.store)
    if spec.check_store:  # every shard file against its CRC32C now, not in the epoch that first reads it
        if problems := integrity_problems(store):
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StoreError(f"--check-store: {problems[0]}{more}; {repair_hint(store.path)}")
    store.check_compatible(recipe, recipe.views, fingerprint, images_fingerprint(spec.backgrounds))
    # The run is bound to this exact store: its unique id, seed, image count, ... (all but file locations).
    store_identity = {key: value for key, value in store.attrs.items() if not key.endswith("_path")}
    return Inputs(fingerprint, backgrounds, store, store_identity, None, store.num_images, store.chunk_images)


def feed_plan(spec: TrainSpec, inputs: Inputs, optim: OptimConfig, global_batch: int, *, world_size: int,
              rank: int) -> FeedPlan:
    """Which images each rank reads in which order: micro-batches of the global batch over ranks and
    accumulation steps."""
    plan = FeedPlan(num_images=inputs.num_images, chunk_images=inputs.chunk_images,
                    micro_batch=global_batch // (world_size * optim.accum_steps),
                    world_size=world_size, rank=rank, accum_steps=optim.accum_steps, seed=spec.seed,
                    window_images=spec.window_images)
    if plan.steps_per_epoch < 1:
        raise TrainingError(f"global batch {global_batch} is larger than the {inputs.num_images} images of "
                            f"{spec.images}; use a smaller --batch-size")
    return plan


def open_validation(spec: TrainSpec, recipe: Recipe, inputs: Inputs, device: torch.device) -> Validation | None:
    """The --val-store's evaluation, checked against the training inputs (None without one)."""
    if not spec.val_store:
        return None
    store = inputs.store
    val_images = spec.val_images or spec.images
    teacher_identity = store_teacher(store.attrs) if store is not None else \
        online_teacher(spec.teacher_weights, spec.teacher_options, device)
    val_store = open_validation_store(spec.val_store, recipe=recipe, images=val_images,
                                      backgrounds=spec.backgrounds, teacher=teacher_identity,
                                      training_images_fingerprint=inputs.fingerprint,
                                      training_store_seed=None if store is None else store.attrs["seed"])
    return Validation(val_store, val_images, inputs.backgrounds, recipe, device)


def claim_run(spec: TrainSpec, held: ExitStack, recipe: Recipe, global_batch: int, inputs: Inputs,
              validation: Validation | None, device: torch.device, world_size: int) -> tuple[Path, str]:
    """(run folder, run id): the folder locked for the run (a second process or job is refused), checked
    against the run's record (or prepared for a new run), and torch's threads set as recorded."""
    run_dir = Path(spec.out)
    if spec.resume:
        check_view_records_of_run(run_dir)
    threads = compute_threads(recorded_compute_threads(run_dir) if spec.resume else None)
    torch.set_num_threads(threads)
    config = run_record(spec, recipe, global_batch, inputs.fingerprint, inputs.store_identity,
                        None if validation is None else
                        validation_record(validation.store, spec.val_images or spec.images),
                        device=device, ranks=world_size, threads=threads)
    held.enter_context(claim_run_folder(run_dir, config, resume=spec.resume, resumable_keys=RESUMABLE_KEYS,
                                        inexact_keys=INEXACT_KEYS, inexact=spec.inexact_resume))
    return run_dir, recorded_run_id(run_dir)


def build_or_resume(spec: TrainSpec, recipe: Recipe, device: torch.device, peak_lr: float, run_dir: Path,
                    run_id: str, *, rank: int, world_size: int):
    """(Distiller, its student's EMA, AdamW, steps done): built, and with --resume loaded from the checkpoint
    with each rank's random state."""
    torch.manual_seed(spec.seed)  # identical init everywhere (DDP also broadcasts rank 0's weights)
    model, ema_student, optimizer = build_distiller(recipe, device, peak_lr, compile_model=spec.compile,
                                                    student_weights=None if spec.resume else spec.student_weights)
    if not spec.resume:
        torch.manual_seed(spec.seed + 1 + rank)  # per-rank stream for drop-path draws
        return model, ema_student, optimizer, 0
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
    return model, ema_student, optimizer, step


def open_feed(spec: TrainSpec, recipe: Recipe, inputs: Inputs, plan: FeedPlan, device: torch.device):
    """(the data feed, the target source): the store's targets, or the teacher with its shape-mask calibration."""
    if spec.teacher_online:
        return (OnlineFeed(spec.images, inputs.backgrounds, plan, recipe.views, workers=spec.workers),
                OnlineTeacher.calibrated(inputs.teacher, spec.images, inputs.backgrounds, recipe.views, device,
                                         count=spec.calibration_images, seed=spec.seed, batch=plan.micro_batch))
    return (CachedFeed(spec.images, inputs.store, inputs.backgrounds, plan, recipe.views, workers=spec.workers,
                       pin=device.type == "cuda"), CachedTargets())


def describe_start(spec: TrainSpec, recipe: Recipe, trainer: Trainer, schedule: Schedule, inputs: Inputs,
                   plan: FeedPlan, step: int, last_step: int, run_dir: Path) -> str:
    """The run's first log line: what trains on what, how big, for how long, where."""
    def millions(module) -> str:
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"

    optim, model, world_size = schedule.optim, trainer.model, trainer.world_size
    source_text = (f"online teacher {spec.teacher_weights}" if spec.teacher_online else
                   f"store {spec.store} (K={inputs.store.attrs.get('views_per_image')} view sets per image)")
    return (f"{'resuming at step ' + str(step) if spec.resume else 'starting'}: recipe {recipe.name} on "
            f"{world_size} x {trainer.device}; parameters: student {millions(model.student)}, decoder "
            f"{millions(model.decoder)}, EMA {millions(trainer.ema_student)}; {inputs.num_images} images, "
            f"{source_text}; global batch {plan.global_batch} ({world_size} ranks x {optim.accum_steps} "
            f"accumulation x {plan.micro_batch}); {schedule.steps_per_epoch} steps per epoch x {optim.epochs} epochs = "
            f"{schedule.total_steps} steps, running to {last_step}; peak lr {schedule.peak_lr:.3g} after "
            f"{schedule.warmup_steps} warm-up steps; run folder {run_dir}")


def progress_bar(spec: TrainSpec, recipe: Recipe, global_batch: int, step: int, last_step: int):
    """A tqdm bar of the steps on a terminal unless --no-progress (None: plain log lines instead)."""
    if not (spec.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True,
                desc=f"{recipe.name} (global batch {global_batch})")


def train(spec: TrainSpec) -> Path:
    with ExitStack() as held:  # the run folder's writer lock, from the folder's check to the end of the run
        return _train(spec, held)


def _train(spec: TrainSpec, held: ExitStack) -> Path:
    rank, world_size, device = set_up_process(spec)
    master = rank == 0
    recipe = apply_overrides(resolve_recipe(spec.recipe), spec)
    global_batch = global_batch_size(spec, recipe.optim, world_size)
    inputs = open_inputs(spec, recipe, device, master)  # all checked before anything is written
    plan = feed_plan(spec, inputs, recipe.optim, global_batch, world_size=world_size, rank=rank)
    if master:
        print(describe_view_set_reuse(recipe.optim.epochs, inputs.store.views_per_image) if inputs.store is not None
              else "online teacher: every view set is new (used once)")
    validation = open_validation(spec, recipe, inputs, device)
    schedule = Schedule(recipe.optim, plan.steps_per_epoch, spec.lr if spec.lr is not None else
                        recipe.optim.peak_lr(global_batch))
    last_step = schedule.total_steps if spec.max_steps is None else min(schedule.total_steps, spec.max_steps)
    if spec.max_steps is not None:
        note_adjusted("--max-steps", spec.max_steps, last_step, f"the schedule has {schedule.total_steps} steps in all")
    run_dir, run_id = claim_run(spec, held, recipe, global_batch, inputs, validation, device, world_size)
    model, ema_student, optimizer, step = build_or_resume(spec, recipe, device, schedule.peak_lr, run_dir, run_id,
                                                          rank=rank, world_size=world_size)
    autocast = make_autocast(device, recipe.optim)
    feed, source = open_feed(spec, recipe, inputs, plan, device)
    trainer = Trainer(model, ema_student, optimizer, source, autocast, world_size)
    folder = RunFolder(run_dir, run_id, spec, trainer, schedule, recipe=recipe.name, global_batch=global_batch,
                       master=master, validation=validation, saved_step=step if spec.resume else None)
    stop = StopRequest(folder.kept, world_size=world_size, device=device)
    stop.install()  # from here on a signal stops at a step boundary, with a checkpoint
    if master:
        LOG.info(describe_start(spec, recipe, trainer, schedule, inputs, plan, step, last_step, run_dir))
    log = StepLog(global_batch=global_batch, last_step=last_step, kept=folder.kept, plain_lines=master,
                  metrics=MetricsLog(run_dir, resume_step=step if spec.resume else None,
                                     validation=validation is not None) if master else None,
                  progress=progress_bar(spec, recipe, global_batch, step, last_step) if master else None)
    try:
        step = run_steps(trainer, schedule, rendered_ahead(feed, recipe.views, device, source), log, step=step,
                         last_step=last_step, folder=folder, stop=stop)
    finally:
        log.close()
    folder.finish(step)
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

