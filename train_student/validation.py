"""Validation on fresh views: every loss term of a student and its decoder on a store of view sets it never
trained on, during training (`--val-store`) and after it (`python -m train_student evaluate`).

A validation store is an ordinary target store (`cache_teacher run`) of the run's teacher checkpoint and views:
either of the training images cached with another --seed (fresh views of the same images; `--limit-images`
keeps it cheap), or of held-out images (its own images file). `open_validation_store` refuses any other.
Each stored view set of each image is evaluated once, with local crops drawn from the store's seed
(`formats.view_records.evaluation_local_crops`), so every evaluation of one store sees the same views.

Evaluation changes nothing about training: the student and decoder run in eval mode without gradients, their
modes are restored afterwards, and the global RNG streams are forked around it (a resumed run stays
bit-identical whether or not it validates). Samples are evaluated one at a time: every loss term is a mean
over samples, so the per-image values average to the batch loss, and per-image values are what `evaluate`
reports.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dpal.config import Recipe
from dpal.distill import distill_step_losses
from dpal.losses import LossTerms
from dpal.errors import UserError
from dpal.views import render_local_crops, render_view_sets
from formats.images import ImageFile, images_fingerprint
from formats.store import TargetStore, describe_differences, file_sha256, open_store
from formats.schema import VIEW_PARAMS_ARRAY
from formats.targets import Targets
from formats.teacher_side import BackgroundPool, teacher_precision
from formats.view_records import evaluation_local_crops

# What makes two stores targets of the same teacher (beside the recipe's teacher, checked by check_compatible).
TEACHER_KEYS = ("checkpoint_sha256", "teacher_options", "teacher_precision")


class ValidationError(UserError):
    """A validation store that does not fit the run (or the evaluated checkpoint)."""


def store_teacher(attrs: dict) -> dict:
    """The teacher identity (TEACHER_KEYS) a store's targets come from."""
    return {key: attrs.get(key) for key in TEACHER_KEYS}


def online_teacher(weights, options: dict, device: torch.device | None) -> dict:
    """The teacher identity of an online-teacher run: its checkpoint, load options and, when the training
    device is known, its precision (`formats.teacher_side.teacher_precision`)."""
    identity = {"checkpoint_sha256": file_sha256(weights), "teacher_options": options}
    if device is not None:
        identity["teacher_precision"] = teacher_precision(device)
    return identity


def open_validation_store(path, *, recipe: Recipe, images, backgrounds, teacher: dict,
                          training_images_fingerprint: str, training_store_seed: int | None,
                          allow_training_views: bool = False) -> TargetStore:
    """The store at `path`, checked to fit the run: the recipe's teacher and views, the images file `images`
    (the training images, or held-out ones), the background pool, and the teacher identity `teacher`
    (TEACHER_KEYS). A store of the training images must have been cached with another seed than the training
    store (`training_store_seed`; None for an online run, whose views come from streams of their own), unless
    `allow_training_views` (`evaluate --training-views`: the loss on the views the run trained on, to set
    beside the loss on fresh ones)."""
    store = open_store(path)
    try:
        store.check_compatible(recipe, recipe.views, images_fingerprint(images), images_fingerprint(backgrounds))
    except UserError as exc:
        raise ValidationError(f"validation store: {exc}") from None
    if problems := describe_differences(store.attrs, teacher, teacher):
        raise ValidationError(f"validation store {path} holds targets of another teacher than this run's "
                              f"({'; '.join(problems)}); cache it with the run's teacher checkpoint and options")
    same_images = store.attrs["images_fingerprint"] == training_images_fingerprint
    if (same_images and training_store_seed is not None and store.attrs["seed"] == training_store_seed
            and not allow_training_views):
        raise ValidationError(f"validation store {path} was cached from the training images with the training "
                              f"store's --seed {training_store_seed}: its views are the ones training sees, not fresh ones; "
                              f"cache it with another --seed (and --limit-images to keep it small)")
    if allow_training_views and not (same_images and store.attrs["seed"] == training_store_seed):
        raise ValidationError(f"--training-views: {path} is not a store of the run's training views (cached from "
                              f"other images or with another --seed); leave --training-views out for fresh views")
    return store


@contextmanager
def evaluation_mode(*modules: torch.nn.Module):
    """Modules in eval mode, no gradients, the global RNG streams untouched; the modules' modes restored after."""
    modes = [[(m, m.training) for m in module.modules()] for module in modules]
    devices = sorted({p.device.index for module in modules for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for module in modules:
            module.eval()
        try:
            yield
        finally:
            for saved in modes:
                for module, training in saved:
                    module.training = training


class Validation:
    """A validation store with its images and backgrounds, evaluated on one device."""

    def __init__(self, store: TargetStore, images, backgrounds: BackgroundPool, recipe: Recipe,
                 device: torch.device):
        self.store, self.backgrounds, self.recipe, self.device = store, backgrounds, recipe, device
        self.image_file = ImageFile(images)
        self.seed = store.attrs["seed"]

    @property
    def num_images(self) -> int:
        return self.store.num_images

    def per_image(self, student: torch.nn.Module, decoder: torch.nn.Module, *, moe_loss_weight: float,
                  autocast) -> np.ndarray:
        """Loss terms (`LossTerms` order) of each image of the store, averaged over its stored view sets:
        [images, len(LossTerms._fields)] float64."""
        store, cfg, chunk = self.store, self.recipe.views, self.store.chunk_images
        sums = np.zeros((store.num_images, len(LossTerms._fields)))
        with evaluation_mode(student, decoder):
            for block in range(store.num_blocks):
                first = block * chunk
                indices = range(first, min(first + chunk, store.num_images))
                images = [torch.from_numpy(self.image_file.image(i)) for i in indices]
                for view_set in range(store.views_per_image):
                    arrays = store.read_block(block, view_set)
                    params = torch.from_numpy(arrays[VIEW_PARAMS_ARRAY])
                    targets = Targets.from_arrays({k: torch.from_numpy(v) for k, v in arrays.items()})
                    views = render_view_sets(images, self.backgrounds, params, cfg, device=self.device)
                    local_params = torch.cat([evaluation_local_crops(self.seed, i, view_set, cfg) for i in indices])
                    local_views = render_local_crops(images, local_params, cfg, device=self.device)
                    for row, index in enumerate(indices):
                        one = slice(row, row + 1)
                        sample = {name: value[one].to(self.device) for name, value in
                                  targets.loss_arguments().items()}
                        with autocast:
                            terms = distill_step_losses(student, decoder, self.recipe.teacher,
                                                        global_view=views.global_view[one],
                                                        local_views=local_views[one], crowd_view=views.crowd[one],
                                                        moe_loss_weight=moe_loss_weight, **sample)
                        sums[index] += torch.stack([term.float() for term in terms]).cpu().numpy()
        return sums / store.views_per_image

    def mean(self, student, decoder, *, moe_loss_weight: float, autocast) -> dict[str, float]:
        """The loss terms by written name (`LossTerms.names()`), averaged over every image and view set."""
        values = self.per_image(student, decoder, moe_loss_weight=moe_loss_weight, autocast=autocast).mean(axis=0)
        return dict(zip(LossTerms.names(), values.tolist()))


def validation_record(store: TargetStore, images) -> dict:
    """What a run records of its validation store (run.json): a resume must validate on the same one."""
    return {"store": str(Path(store.path).resolve()), "store_id": store.attrs.get("store_id"),
            "images": str(Path(images).resolve())}
