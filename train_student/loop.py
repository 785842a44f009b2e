"""The training loop, and the objects it drives: `train.py` runs it for a run, `bench.py` times it.

`run_steps` reads top to bottom: fetch the next ready micro-batch, forward and backward, and after the
recipe's accumulation steps the optimizer step; then log it, validate, checkpoint, export, stop. What varies
between a run and the benchmark is passed in: where the ready batches come from, the `StepLog` (a run's
writes its metrics; the benchmark's times a window of steps), and the run's folder and stop request (the
benchmark has neither: it writes no checkpoint and installs no signal handler).

The host reads a step's values (loss terms, grad norm) one step late, once the next step is queued behind
them, so the device queue never runs dry (`StepLog.stepped`); a checkpoint or export first settles the step
it saves.
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dpal.config import OptimConfig, ViewConfig
from dpal.losses import LossTerms, moe_weight
from runtime.ahead import HostCopy, RunAhead
from runtime.cli import Interrupted
from train_student.checkpoint import CHECKPOINT_NAME, keep_step_copy, rng_state, save_checkpoint
from train_student.export import write_exports
from train_student.metrics import LOSS_PLOT, METRICS_CSV, MetricsLog, plot_losses
from train_student.prefetch import ReadyBatch, render_ahead
from train_student.step import Distiller, TargetSource, TrainingError, forward_backward, optimizer_step
from train_student.validation import Validation

LOG = logging.getLogger("dpal.train")
# Plain log lines per run when there is no progress bar (not a terminal, or --no-progress).
LOG_LINES_PER_RUN = 50


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


@dataclass(frozen=True)
class Schedule:
    """The recipe's optimisation per step: learning rate, EMA momentum and MoE loss weight over its epochs
    of `steps_per_epoch` optimizer steps (each of `optim.accum_steps` micro-batches)."""

    optim: OptimConfig
    steps_per_epoch: int
    peak_lr: float

    @property
    def total_steps(self) -> int:
        return self.optim.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return self.optim.warmup_epochs * self.steps_per_epoch

    def lr(self, step: int) -> float:
        return learning_rate(step, peak=self.peak_lr, min_lr=self.optim.min_lr, warmup_steps=self.warmup_steps,
                             total_steps=self.total_steps)

    def momentum(self, step: int) -> float:
        return ema_momentum(step, start=self.optim.ema_momentum[0], end=self.optim.ema_momentum[1],
                            total_steps=self.total_steps)

    def moe_weight(self, epoch: int) -> float:
        return moe_weight(epoch, self.optim)

    def epoch_of(self, done_steps: int) -> int:
        """The epoch of the last of `done_steps` optimizer steps."""
        return max(0, done_steps - 1) // self.steps_per_epoch


@dataclass
class Trainer:
    """What a step runs and updates: the student and decoder (wrapped for DDP with several ranks), the
    student's EMA, AdamW, and where the targets come from."""

    model: Distiller
    ema_student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    source: TargetSource
    autocast: ContextManager
    world_size: int
    device: torch.device = field(init=False)
    ddp_model: torch.nn.Module = field(init=False)

    def __post_init__(self):
        self.device = next(self.model.parameters()).device
        self.ddp_model = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None) \
            if self.world_size > 1 else self.model
        self._trained = list(self.model.parameters())
        self._student, self._ema = list(self.model.student.parameters()), list(self.ema_student.parameters())

    def forward_backward(self, ready: ReadyBatch, moe_loss_weight: float, accum_steps: int, *,
                         sync: bool) -> torch.Tensor:
        """One micro-batch's loss terms (stacked, on the device); gradients are averaged over the ranks only
        with `sync`, on the step's last micro-batch."""
        with nullcontext() if sync or self.world_size == 1 else self.ddp_model.no_sync():
            return forward_backward(self.ddp_model, ready, self.source, self.autocast, moe_loss_weight, accum_steps)

    def update(self, term_sums: torch.Tensor, *, accum_steps: int, lr: float, momentum: float) -> HostCopy:
        return optimizer_step(self.optimizer, self._trained, self._student, self._ema, term_sums,
                              accum_steps=accum_steps, lr=lr, momentum=momentum, world_size=self.world_size)

    def state(self) -> dict:
        """The weights and the optimizer's state, as a checkpoint holds them."""
        return {"student": self.model.student.state_dict(), "decoder": self.model.decoder.state_dict(),
                "student_ema": self.ema_student.state_dict(), "optimizer": self.optimizer.state_dict()}


def rendered_ahead(feed, views: ViewConfig, device: torch.device,
                   source: TargetSource) -> Callable[[int, int], RunAhead]:
    """`run_steps`'s ready batches from a feed (`feed.epoch(epoch, start_micro)`): the views of micro-batch
    N+1 rendered (and its targets staged) on the training device while N computes."""
    return lambda epoch, start_micro: render_ahead(feed.epoch(epoch, start_micro), views, device, source)


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


class StepLog:
    """The loop's book-keeping: the loss terms of the step's micro-batches summed, its host time and the part
    of it spent waiting for data; each step's values read one step late (`settle`: a non-finite loss or
    gradient stops the run, naming what `kept` says is kept) and written: the metrics (rank 0), a progress
    bar, or plain log lines (`LOG_LINES_PER_RUN`)."""

    def __init__(self, *, global_batch: int, last_step: int, kept: Callable[[], str], metrics: MetricsLog | None = None,
                 progress=None, plain_lines: bool = False):
        self.global_batch, self.last_step, self.kept = global_batch, last_step, kept
        self.metrics, self.progress, self.plain_lines = metrics, progress, plain_lines
        self.plain_every = max(1, last_step // LOG_LINES_PER_RUN)
        self.term_sums: torch.Tensor | None = None
        self.micro_batches = 0
        self._pending: StepValues | None = None
        self._step_start = self._data_wait = 0.0

    def begin(self) -> None:
        """The first step's time starts now."""
        self._step_start, self._data_wait = time.perf_counter(), 0.0

    def waited(self, batches: Iterator[ReadyBatch]) -> Iterator[ReadyBatch]:
        """``batches``, the time spent waiting for each counted as the step's data wait."""
        while True:
            start = time.perf_counter()
            ready = next(batches, None)
            self._data_wait += time.perf_counter() - start
            if ready is None:
                return
            yield ready

    def add(self, terms: torch.Tensor) -> None:
        """One micro-batch's loss terms, summed into the step's."""
        self.term_sums = terms if self.term_sums is None else self.term_sums + terms
        self.micro_batches += 1

    def stepped(self, step: int, epoch: int, lr: float, momentum: float, moe_loss_weight: float,
                values: HostCopy) -> None:
        """Optimizer step `step` is queued: settle the step before, and hold this one's values until the next."""
        now = time.perf_counter()
        self.settle()
        self._pending = StepValues(step, epoch, lr, momentum, moe_loss_weight, now - self._step_start,
                                   self._data_wait, values)
        self._step_start, self._data_wait, self.term_sums, self.micro_batches = now, 0.0, None, 0

    def settle(self) -> None:
        """Read the pending step's values: stop the run if they are not finite, else write them."""
        if self._pending is None:
            return
        done, self._pending = self._pending, None
        *values, grad_norm = done.values.wait().tolist()
        terms = LossTerms(*values)
        if not all(math.isfinite(v) for v in values + [grad_norm]):
            named = ", ".join(f"{name}={value}" for name, value in terms.by_name().items())
            raise TrainingError(f"loss or gradient is not finite at step {done.step} (epoch {done.epoch}): "
                                f"{named}, grad norm={grad_norm}; training stopped, {self.kept()}. Check the "
                                f"store's targets and the learning rate.")
        self.write(done, terms, grad_norm)

    def write(self, done: StepValues, terms: LossTerms, grad_norm: float) -> None:
        samples_per_s = self.global_batch / done.seconds
        if self.metrics is not None:
            self.metrics.log({"step": done.step, "epoch": done.epoch, **terms.by_name(), "lr": done.lr,
                              "ema_momentum": done.momentum, "moe_weight": done.moe_weight, "grad_norm": grad_norm,
                              "samples_per_s": samples_per_s, "data_wait_share": done.data_wait / done.seconds})
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{terms.total:.4f}", lr=f"{done.lr:.2e}", samples_s=f"{samples_per_s:.1f}",
                                      refresh=False)
            self.progress.update(1)
        elif self.plain_lines and (done.step % self.plain_every == 0 or done.step == self.last_step):
            LOG.info(f"step {done.step}/{self.last_step} epoch {done.epoch}: loss {terms.total:.4f} lr {done.lr:.3g} "
                     f"grad norm {grad_norm:.3g} {samples_per_s:.1f} samples/s")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.metrics is not None:
            self.metrics.close()


class StepTimer(StepLog):
    """A step log that times instead of writing: samples/s over the steps after the first `untimed_steps`,
    measured from and to an idle device, and the share of that time spent waiting for the next ready batch."""

    def __init__(self, *, global_batch: int, untimed_steps: int, last_step: int, device: torch.device):
        super().__init__(global_batch=global_batch, last_step=last_step, kept=lambda: "nothing is kept")
        self.untimed_steps, self.device = untimed_steps, device
        self._window_start, self._waited = 0.0, 0.0

    def begin(self) -> None:
        super().begin()
        if self.untimed_steps == 0:
            self._start_window()

    def stepped(self, step: int, *values) -> None:
        super().stepped(step, *values)
        if step == self.untimed_steps:
            self.settle()
            self._start_window()

    def write(self, done: StepValues, terms: LossTerms, grad_norm: float) -> None:
        if done.step > self.untimed_steps:
            self._waited += done.data_wait

    def rates(self) -> dict[str, float]:
        """After the loop: {"samples_per_s", "wait_share"} of the timed steps."""
        self._synchronize()
        elapsed = time.perf_counter() - self._window_start
        timed_steps = self.last_step - self.untimed_steps
        return {"samples_per_s": timed_steps * self.global_batch / elapsed, "wait_share": self._waited / elapsed}

    def _start_window(self) -> None:
        self._synchronize()
        self._window_start, self._waited = time.perf_counter(), 0.0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class StopRequest:
    """SIGINT / SIGTERM during the training loop: remembered, and acted on at the next optimizer step
    boundary (all ranks agree through a host-side vote there), where a checkpoint is written and the run
    stops; a second signal stops at once, without saving."""

    def __init__(self, describe_kept: Callable[[], str], *, world_size: int, device: torch.device):
        self.signum: int | None = None
        self.describe_kept, self.world_size = describe_kept, world_size
        # A host-side all-reduce (gloo) at every step boundary: ranks agree without a device sync.
        self._group = dist.new_group(backend="gloo") if world_size > 1 and device.type == "cuda" else None

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

    def voted(self) -> bool:
        """Whether any rank was signalled."""
        vote = torch.tensor([float(self.signum is not None)])
        if self.world_size > 1:
            dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._group)
        return bool(vote.item() > 0)

    def stop_run(self, step: int, checkpoint: Path) -> None:
        """End the run after the checkpoint of `step` was written."""
        if self.world_size > 1:  # no rank exits (making torchrun stop the others) before the save is done
            dist.barrier()
            dist.destroy_process_group()
        signum = self.signum or signal.SIGTERM  # a rank that was not signalled itself follows the others
        raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint "
                                  f"{checkpoint} written: continue with the same command and --resume")


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


class RunFolder:
    """What a run writes into its folder as it goes: validation rows every --val-every steps, checkpoints every
    --checkpoint-every steps (the newest --keep-checkpoints kept), exports every --export-every steps; and at
    the end all three and the loss plot. Rank 0 writes; every rank takes part in a checkpoint (its RNG state)."""

    def __init__(self, path: Path, run_id: str, spec, trainer: Trainer, schedule: Schedule, *, recipe: str,
                 global_batch: int, master: bool, validation: Validation | None, saved_step: int | None):
        self.path, self.run_id, self.spec, self.trainer, self.schedule = path, run_id, spec, trainer, schedule
        self.recipe, self.global_batch, self.master, self.validation = recipe, global_batch, master, validation
        self.saved_step = saved_step
        self.checkpoint_path = path / CHECKPOINT_NAME

    def kept(self) -> str:
        return (f"the last checkpoint {self.checkpoint_path} (step {self.saved_step}) is kept"
                if self.saved_step is not None else "no checkpoint had been written yet, nothing of the run is kept")

    def validation_due(self, step: int) -> bool:
        return _due(self.spec.val_every, step)

    def checkpoint_due(self, step: int) -> bool:
        return _due(self.spec.checkpoint_every, step)

    def export_due(self, step: int) -> bool:
        return self.master and _due(self.spec.export_every, step)

    def validate(self, step: int, log: StepLog) -> None:
        """Evaluate on the validation store after `step` steps and log it (rank 0; the others go on)."""
        if self.validation is None or log.metrics is None:
            return
        model, epoch = self.trainer.model, self.schedule.epoch_of(step)
        terms = self.validation.mean(model.student, model.decoder, autocast=self.trainer.autocast,
                                     moe_loss_weight=self.schedule.moe_weight(epoch))
        log.metrics.log_validation({"step": step, "epoch": epoch, **terms})

    def checkpoint(self, step: int) -> None:
        rng_states = [rng_state(self.trainer.device)]
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        state = {"recipe": self.recipe, "step": step,
                 "moe_weight": self.schedule.moe_weight(self.schedule.epoch_of(step)), **self.trainer.state(),
                 "rng": rng_states}
        if self.master:
            save_checkpoint(self.path, state, self.run_id)
            keep_step_copy(self.path, step, self.spec.keep_checkpoints)
        self.saved_step = step

    def export(self, step: int) -> None:
        write_exports(self.path, self.trainer.model.student, self.trainer.ema_student, step=step, recipe=self.recipe,
                      global_batch=self.global_batch, program=self.spec.export_program)

    def finish(self, step: int) -> None:
        """The run's end: a last checkpoint, the exports, the loss plot."""
        self.checkpoint(step)
        if self.master:
            self.export(step)
            plot_losses(self.path / METRICS_CSV, self.path / LOSS_PLOT)
            LOG.info(f"finished {step} steps; run folder {self.path}: {CHECKPOINT_NAME}, student/, student_ema/ "
                     f"(timm exports), {METRICS_CSV}, {LOSS_PLOT}, tensorboard/")


def run_steps(trainer: Trainer, schedule: Schedule, ready_batches: Callable[[int, int], ContextManager[Iterator]],
              log: StepLog, *, step: int, last_step: int, folder: RunFolder | None = None,
              stop: StopRequest | None = None) -> int:
    """Optimizer steps from `step` (done) to `last_step`; returns the step reached. `ready_batches(epoch,
    start_micro)`: the epoch's ready micro-batches from `start_micro` on; `folder` and `stop`: a run's (None:
    no validation, checkpoints, exports or stop request, as in the benchmark)."""
    accum_steps = schedule.optim.accum_steps
    epoch, start_micro = divmod(step, schedule.steps_per_epoch)
    trainer.ddp_model.train()
    log.begin()
    while step < last_step:
        moe_loss_weight = schedule.moe_weight(epoch)
        with ready_batches(epoch, start_micro * accum_steps) as batches:
            for ready in log.waited(batches):
                last_micro = log.micro_batches + 1 == accum_steps
                log.add(trainer.forward_backward(ready, moe_loss_weight, accum_steps, sync=last_micro))
                if not last_micro:
                    continue
                lr, momentum = schedule.lr(step), schedule.momentum(step)
                values = trainer.update(log.term_sums, accum_steps=accum_steps, lr=lr, momentum=momentum)
                step += 1
                log.stepped(step, epoch, lr, momentum, moe_loss_weight, values)  # settles the step before
                stopping = stop is not None and stop.voted() and step < last_step
                if folder is not None and step < last_step:
                    if folder.validation_due(step):
                        folder.validate(step, log)  # before the checkpoint: a resume from it never misses this row
                    if stopping or folder.checkpoint_due(step):
                        log.settle()  # no checkpoint after a step whose values were not checked
                        folder.checkpoint(step)
                    if folder.export_due(step):
                        log.settle()  # exports only of checked steps
                        folder.export(step)
                if stopping:
                    stop.stop_run(step, folder.checkpoint_path)
                if step == last_step:
                    break
        epoch, start_micro = epoch + 1, 0
    log.settle()
    if folder is not None:
        folder.validate(step, log)
    return step
