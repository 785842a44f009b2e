"""One training step as its own unit: the model it trains, where its targets come from, and the update.

`loop.run_steps`, the loop that `train.py` and `bench.py` both run, goes over it like this:

    batches = render_ahead(feed.epoch(epoch), cfg, device, source)   # prefetch.py: views of N+1 during N
    for ready in batches:
        term_sums += forward_backward(model, ready, source, autocast, moe_loss_weight, accum_steps)
        ...                                                             # after accum_steps micro-batches:
        pending = optimizer_step(optimizer, params, term_sums, ...)     # metrics stay on the device
        values = previous.wait()                                       # the step before's, read one step late

A target source (`TargetSource`) has two sides: `stage`, called on the render-ahead thread (what can be
prepared before the step: the cached targets' copies to the device), and `targets`, called on the step's
path with the rendered views. `CachedTargets` reads them from the store, `OnlineTeacher` runs the teacher
on the views at every step (the baseline). Both feed `dpal.distill.distill_step_losses` the same way.

Nothing here reads a device value on the host: the finite check and the logged metrics come from the
`HostCopy` that `optimizer_step` returns, read a step later, so the device queue never drains between steps.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Protocol

import torch
import torch.distributed as dist

from dpal.config import OptimConfig, Recipe, ViewConfig
from dpal.decoder import DynamicPatternDecoder
from dpal.distill import distill_step_losses
from dpal.errors import UserError
from dpal.losses import LossTerms
from dpal.shape_mask import ShapeMaskCalibration
from dpal.students import build_student, load_initial_weights
from formats.images import ImageFile
from formats.teacher_side import ONLINE_CALIBRATION_VIEWS_PER_IMAGE, BackgroundPool, TeacherSide
from runtime.ahead import HostCopy
from runtime.cli import note_adjusted
from train_student.data import FeedBatch


class TrainingError(UserError):
    """Training stopped for a reason the user must act on (message says what and what was kept)."""


class Distiller(torch.nn.Module):
    """Student + decoder as one module, so DDP sees every trained parameter in one forward."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.teacher_spec = recipe.teacher
        self.student = build_student(recipe)
        self.decoder = DynamicPatternDecoder(recipe.decoder)

    def forward(self, views: dict, targets: dict, moe_loss_weight: float) -> LossTerms:
        return distill_step_losses(self.student, self.decoder, self.teacher_spec, **views, **targets,
                                   moe_loss_weight=moe_loss_weight)


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


# What `--compile` compiles: the student and the decoder, whether the decoder runs its plain-PyTorch reference
# or the fused ops (custom ops that torch.compile calls as they are, compiling what is around them).
COMPILED_PARTS = ("student", "decoder")


def build_distiller(recipe: Recipe, device: torch.device, lr: float, *, compile_model: bool = False,
                    student_weights: str | None = None):
    """(Distiller on the device, its student's EMA copy, AdamW over the spec's parameter groups).

    ``compile_model`` compiles the `COMPILED_PARTS` in place (`nn.Module.compile`): parameter and state-dict
    names stay those of the eager modules, so checkpoints and exports do not change. ``student_weights``: a
    timm state dict the student (and so its EMA) starts from instead of the recipe's init."""
    model = Distiller(recipe)
    if student_weights is not None:
        load_initial_weights(model.student, student_weights)
    model = model.to(device)
    ema_student = copy.deepcopy(model.student).requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, recipe.optim.weight_decay), lr=lr, betas=recipe.optim.betas,
                                  fused=device.type == "cuda")
    if compile_model:
        for name in COMPILED_PARTS:
            getattr(model, name).compile()
    return model, ema_student, optimizer


def make_autocast(device: torch.device, optim: OptimConfig):
    """Autocast to the recipe's mixed-precision dtype on CUDA; none on the CPU, which trains in float32."""
    return torch.autocast("cuda", dtype=getattr(torch, optim.amp_dtype)) if device.type == "cuda" else nullcontext()


# ----------------------------------------------------------------------------------- target sources

class TargetSource(Protocol):
    """Where a step's targets come from (see the module docstring)."""

    def stage(self, batch: FeedBatch, device: torch.device) -> dict[str, torch.Tensor]:
        """On the render-ahead thread (and stream): prepare what does not need the views."""

    def targets(self, views: dict[str, torch.Tensor], staged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """On the step's path: `distill_step_losses`'s target arguments."""


class CachedTargets:
    """Targets from the store: the batch's rows, copied to the device ahead of the step (pinned on CUDA)."""

    def stage(self, batch: FeedBatch, device: torch.device) -> dict[str, torch.Tensor]:
        return batch.targets.to(device, non_blocking=True).loss_arguments()

    def targets(self, views, staged):
        return staged


class OnlineTeacher:
    """The baseline without a store: the teacher runs on each step's views, and its targets are what a store
    of these view sets would hold before coding (`formats.teacher_side`: same precision, mask and calibration
    rule as the cache)."""

    def __init__(self, side: TeacherSide, mask_calibration: ShapeMaskCalibration):
        self.side, self.mask_calibration = side, mask_calibration

    @classmethod
    def calibrated(cls, teacher, images_path, backgrounds: BackgroundPool, views: ViewConfig, device: torch.device,
                   *, count: int, seed: int, batch: int) -> "OnlineTeacher":
        """The baseline with its shape mask fitted once, as a one-view-set store of seed `seed` on these images
        would fit it, so that every rank and every resume uses the same one."""
        image_file = ImageFile(images_path)
        note_adjusted("--calibration-images", count, min(count, image_file.num_images),
                      f"{images_path} holds {image_file.num_images} images")
        side = TeacherSide(teacher, backgrounds, views, device, batch)
        calibration, _, _ = side.fit_calibration(image_file, num_images=image_file.num_images, count=count, seed=seed,
                                                 views_per_image=ONLINE_CALIBRATION_VIEWS_PER_IMAGE)
        return cls(side, calibration)

    def stage(self, batch, device):
        return {}

    def targets(self, views, staged):
        out = self.side.run_teacher(views["global_view"], views["crowd_view"])
        return self.side.float_targets(out, self.mask_calibration).loss_arguments()


# -------------------------------------------------------------------------------------- the step

def forward_backward(model: torch.nn.Module, ready, source: TargetSource, autocast, moe_loss_weight: float,
                accum_steps: int) -> torch.Tensor:
    """Forward and backward of one micro-batch (a `prefetch.ReadyBatch`); its `LossTerms` stacked in their
    order, detached, on the device."""
    targets = source.targets(ready.views, ready.staged)
    with autocast:
        terms = model(ready.views, targets, moe_loss_weight)
    (terms.total / accum_steps).backward()
    return torch.stack([term.detach().float() for term in terms])


def apply_update(optimizer: torch.optim.Optimizer, lr: float, student_params: list, ema_params: list,
                 momentum: float) -> None:
    """AdamW step at `lr`, then EMA <- momentum * EMA + (1 - momentum) * student."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, student_params, 1.0 - momentum)


def optimizer_step(optimizer: torch.optim.Optimizer, trained_params: list, student_params: list, ema_params: list,
                   term_sums: torch.Tensor, *, accum_steps: int, lr: float, momentum: float,
                   world_size: int) -> HostCopy:
    """Average the terms over micro-batches and ranks, take the gradient norm, update weights and EMA.
    Returns [`LossTerms` in order..., gradient norm] on its way to the host (read it a step later:
    `wait()` then waits for this step's values, not for the steps queued after); nothing here waits."""
    means = term_sums / accum_steps
    if world_size > 1:
        dist.all_reduce(means, op=dist.ReduceOp.AVG)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trained_params if p.grad is not None])
    values = HostCopy(torch.cat([means, grad_norm.reshape(1).float()]))
    apply_update(optimizer, lr, student_params, ema_params, momentum)
    return values
