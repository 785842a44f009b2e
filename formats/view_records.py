"""View records and the seeds they come from: the one owner of both stages' randomness.

A view record (`dpal.views`) holds every random decision of a view; this module says which records each
image gets and from which seeded stream, so that the cache stage, `verify` and the trainer draw the same ones:
- the cache stage stores K view sets per image, drawn from a generator seeded by (seed, image index) alone,
  so a shard's records do not depend on how the work is split, resumed or distributed (`verify` redraws them
  and compares); its shape mask is calibrated on the first set of a seeded sample of images
  (`calibration_indices`), and so is the online baseline's (`formats.teacher_side`);
- the trainer reads one stored set per block and epoch, and draws fresh local crops (and, in the online
  baseline, fresh view sets) per global micro-batch from (seed, stream, epoch, micro-batch): every rank draws
  the whole global micro-batch and keeps its slice, so N ranks see what one process sees;
- the trainer's traversal order has its own stream, so no two uses of one run seed draw the same numbers;
- validation on a store of fresh views draws each image's local crops from the store's own seed (a stream
  of its own), so every evaluation of a store, during training or after it, sees the same views.
"""
from __future__ import annotations

import numpy as np
import torch

from dpal.config import ViewConfig
from dpal.views import sample_local_crops, sample_view_sets

# Streams derived from a training run's seed (numpy SeedSequence entropy words).
ORDER_STREAM, VIEW_SET_STREAM, LOCAL_CROP_STREAM, ONLINE_VIEW_STREAM, EVALUATION_LOCAL_CROP_STREAM = 1, 2, 3, 4, 5


# ------------------------------------------------------------------------------ the cache stage

def image_view_params(seed: int, image_index: int, views_per_image: int, num_backgrounds: int,
                      cfg: ViewConfig) -> torch.Tensor:
    """The K view sets stored for one image, [K, VIEW_SET_FIELDS]: a function of (seed, image index) only."""
    state = np.random.SeedSequence([seed, image_index]).generate_state(1, dtype=np.uint64)[0]
    return sample_view_sets(torch.Generator().manual_seed(int(state)), views_per_image,
                            num_backgrounds=num_backgrounds, cfg=cfg)


def calibration_indices(num_images: int, count: int, seed: int) -> list[int]:
    """A deterministic random sample of images (their first view set calibrates the shape mask)."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:min(count, num_images)].tolist())


# ------------------------------------------------------------------------------ the trainer

def epoch_order_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's traversal order (blocks and images within windows)."""
    return np.random.default_rng([seed, ORDER_STREAM, epoch])


def block_view_sets(seed: int, num_blocks: int, epoch: int, views_per_image: int) -> np.ndarray:
    """Stored view set used by every image of each block in an epoch: (offset_b + epoch) mod K, [num_blocks].

    offset_b is drawn once from the seed, so every image's set changes each epoch, each stored set is used
    once every K epochs, and a resumed run picks the same ones."""
    offsets = np.random.default_rng([seed, VIEW_SET_STREAM]).integers(views_per_image, size=num_blocks)
    return (offsets + epoch) % views_per_image


def view_set_uses(epochs: int, views_per_image: int) -> tuple[int, int]:
    """(fewest, most) times a stored view set is used in `epochs` epochs: `block_view_sets` walks the K sets
    of a block in turn, one per epoch."""
    return epochs // views_per_image, -(-epochs // views_per_image)


def describe_view_set_reuse(epochs: int, views_per_image: int) -> str:
    """One line for the user: how often each stored view set is reused in `epochs` epochs at K sets per image."""
    fewest, most = view_set_uses(epochs, views_per_image)
    times = f"{most}" if fewest == most else f"{fewest} or {most}"
    return (f"K = {views_per_image} view sets per image over {epochs} epochs: each view set is used {times} "
            f"time{'s' if most > 1 else ''} (online training: once); see docs/choosing-k.md")


def _stream_generator(seed: int, stream: int, first: int, second: int) -> torch.Generator:
    """A torch generator private to one (stream, first, second): a global micro-batch as (epoch, micro-batch),
    whose numbers all ranks draw before slicing, or a validation view as (image, view set)."""
    words = np.random.SeedSequence([seed, stream, first, second]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def local_crop_params(seed: int, epoch: int, micro_step: int, count: int, cfg: ViewConfig) -> torch.Tensor:
    """Fresh local-crop records of a global micro-batch of `count` images: drawn per epoch and step, never
    cached."""
    return sample_local_crops(_stream_generator(seed, LOCAL_CROP_STREAM, epoch, micro_step), count, cfg)


def online_view_params(seed: int, epoch: int, micro_step: int, count: int, num_backgrounds: int,
                       cfg: ViewConfig) -> torch.Tensor:
    """Fresh view sets of a global micro-batch for the online-teacher baseline (no store: drawn every step)."""
    return sample_view_sets(_stream_generator(seed, ONLINE_VIEW_STREAM, epoch, micro_step), count,
                            num_backgrounds=num_backgrounds, cfg=cfg)


def evaluation_local_crops(store_seed: int, image_index: int, view_set: int, cfg: ViewConfig) -> torch.Tensor:
    """Local-crop records [1, num_local, F] that validation pairs with stored view set `view_set` of an image of
    a store cached with `store_seed`: fixed, so that every evaluation of the store sees the same views."""
    return sample_local_crops(_stream_generator(store_seed, EVALUATION_LOCAL_CROP_STREAM, image_index,
                                                     view_set), 1, cfg)
