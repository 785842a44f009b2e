"""The training data feed: which image each rank sees when, its images from FFCV, its targets from Zarr.

Traversal order (`epoch_stream`, `rank_order`): the store's chunks hold `chunk_images` consecutive
images, so reading it block-wise is only efficient if images of a block are consumed close together.
Each epoch therefore permutes the blocks, groups them into windows of about `window_images` images,
and shuffles the images inside each window (seeded by (seed, epoch), the same on every rank). The
resulting global stream is cut into global micro-batches; rank r takes the r-th contiguous slice of
each. A global batch is thus the same set of images whatever the number of ranks, which is what makes
N-rank and 1-rank training match.

One view set per block and epoch (`block_view_sets`): the images of block b use stored set
(offset_b + epoch) mod K, offset_b drawn once from the seed. So every image's view set changes from one
epoch to the next, each stored set is used once every K epochs, resume replays the same choice, and a
block needs exactly one chunk per array of the store (its chunks hold one view set each).

`TargetPrefetcher` is a background thread that walks the same order, reads each needed block once
(a small pool of reader threads runs ahead; decompression releases the GIL), and gathers each batch's
rows straight into per-batch target tensors (pinned when a GPU trains; one vectorised copy per block and
array, no per-sample Python) in a bounded queue. `CachedFeed` zips those with the FFCV image batches
(same order) and background images, and checks every pair (`check_pairing`: the decoded images' sizes must be
the ones recorded for the batch's image indices). Every seeded draw comes from `formats.view_records`.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Empty, Full, Queue

import numpy as np
import torch
from ffcv.loader import Loader
from ffcv.traversal_order.base import TraversalOrder

from dpal.config import ViewConfig
from dpal.errors import UserError
from formats import view_records
from formats.images import ImageFile, image_pipelines, unflatten_images
from formats.schema import VIEW_PARAMS_ARRAY
from formats.targets import CompactTargets, Targets
from formats.teacher_side import BackgroundPool
from runtime.arguments import usable_cores
from train_student.spec import training_on_cpu


@dataclass(frozen=True)
class FeedPlan:
    """Everything that fixes which images a rank sees at which step (pure arithmetic, no I/O)."""

    num_images: int
    chunk_images: int  # images per store block (1 when there is no store)
    micro_batch: int  # images per rank per forward/backward
    world_size: int
    rank: int
    accum_steps: int
    seed: int
    window_images: int  # images shuffled together; bounds the rows held in memory

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch * self.world_size

    @property
    def global_batch(self) -> int:
        return self.global_micro_batch * self.accum_steps

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the incomplete last global batch of an epoch is dropped)."""
        return self.num_images // self.global_batch

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum_steps

    @property
    def num_blocks(self) -> int:
        return -(-self.num_images // self.chunk_images)

    def epoch_stream(self, epoch: int) -> np.ndarray:
        """All image indices in this epoch's global order: shuffled blocks, shuffled within windows."""
        rng = view_records.epoch_order_rng(self.seed, epoch)
        blocks = rng.permutation(self.num_blocks)
        window_blocks = max(1, self.window_images // self.chunk_images)
        parts = []
        for start in range(0, self.num_blocks, window_blocks):
            window = blocks[start:start + window_blocks]
            images = (window[:, None] * self.chunk_images + np.arange(self.chunk_images)).reshape(-1)
            parts.append(rng.permutation(images[images < self.num_images]))
        return np.concatenate(parts)

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's images for the epoch, micro-batch after micro-batch (length micro_batches * micro_batch)."""
        usable = self.micro_batches_per_epoch * self.global_micro_batch
        per_micro = self.epoch_stream(epoch)[:usable].reshape(-1, self.world_size, self.micro_batch)
        return np.ascontiguousarray(per_micro[:, self.rank].reshape(-1))

    def rank_slice(self) -> slice:
        """Where this rank's rows sit inside a global micro-batch."""
        return slice(self.rank * self.micro_batch, (self.rank + 1) * self.micro_batch)


def block_view_sets(plan: FeedPlan, epoch: int, views_per_image: int) -> np.ndarray:
    """Stored view set used by every image of each block in an epoch, [num_blocks] (`formats.view_records`)."""
    return view_records.block_view_sets(plan.seed, plan.num_blocks, epoch, views_per_image)


def local_crop_params(plan: FeedPlan, cfg: ViewConfig, epoch: int, micro_step: int) -> torch.Tensor:
    """Fresh local-crop parameters for this rank's micro-batch: its slice of the global micro-batch's."""
    return view_records.local_crop_params(plan.seed, epoch, micro_step, plan.global_micro_batch,
                                          cfg)[plan.rank_slice()]


def online_view_params(plan: FeedPlan, cfg: ViewConfig, epoch: int, micro_step: int,
                       num_backgrounds: int) -> torch.Tensor:
    """Fresh view sets for this rank's micro-batch of the online-teacher baseline (no store)."""
    return view_records.online_view_params(plan.seed, epoch, micro_step, plan.global_micro_batch, num_backgrounds,
                                           cfg)[plan.rank_slice()]


class PlannedOrder(TraversalOrder):
    """FFCV traversal order that replays `FeedPlan.rank_order`, optionally from a batch inside an epoch."""

    def __init__(self, plan: FeedPlan):
        self.plan = plan
        self.resume_at: tuple[int, int] | None = None  # (epoch, micro-batches already done in it)

    def __call__(self, loader) -> "PlannedOrder":
        # ffcv 1.0.2's Loader accepts an *instance* of TraversalOrder and then calls it with itself.
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        order = self.plan.rank_order(epoch)
        if self.resume_at is not None and self.resume_at[0] == epoch:
            order = order[self.resume_at[1] * self.plan.micro_batch:]
        return order


class FeedPairingError(UserError):
    """An image batch from FFCV is not the batch of images its targets and view records belong to."""


def check_pairing(image_file: ImageFile, indices: torch.Tensor, heights, widths, epoch: int, micro: int) -> None:
    """Refuse a decoded batch whose image sizes are not the ones recorded for the images its targets and view
    records were read for. FFCV and the target reader walk the same order separately, so a slip between them
    would silently pair the views of one image with another image's targets."""
    if reason := image_file.size_mismatch(indices.numpy(), heights, widths):
        raise FeedPairingError(f"micro-batch {micro} of epoch {epoch}: the images FFCV decoded from {image_file.path} "
                               f"are not the images their targets and view records were read for ({reason}); the "
                               f"image loader and the target reader are out of step, a bug to report; this "
                               f"micro-batch was not trained")


@dataclass
class FeedBatch:
    """One micro-batch for one rank, still on the host (pinned when training on a GPU)."""

    indices: torch.Tensor  # [b] image indices in the images file
    images: list[torch.Tensor]  # uint8 [H, W, 3] each
    backgrounds: dict[int, torch.Tensor]  # uint8 [H, W, 3] by pool index: the entries the view records name
    view_params: torch.Tensor  # [b, VIEW_SET_FIELDS]
    local_params: torch.Tensor  # [b, num_local, LOCAL_CROP_FIELDS]
    targets: Targets | CompactTargets | None = None  # from the store (compact: decoded when staged); None online


class TargetPrefetcher:
    """Background thread turning store blocks into this rank's per-batch target tensors, in order."""

    def __init__(self, store, plan: FeedPlan, cfg: ViewConfig, backgrounds: BackgroundPool, epoch: int,
                 start_micro: int, *, pin: bool, queue_batches: int = 4, read_threads: int = 2,
                 read_ahead_blocks: int = 4):
        self.store, self.plan, self.cfg, self.backgrounds = store, plan, cfg, backgrounds
        self.epoch, self.start_micro, self.pin = epoch, start_micro, pin
        self.read_threads, self.read_ahead_blocks = read_threads, read_ahead_blocks
        self.arrays = tuple(store.arrays)  # every stored array: view parameters, targets, int8 row scales
        self.queue: Queue = Queue(maxsize=queue_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpal-target-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._produce()
        except BaseException as exc:  # handed to the consumer, which re-raises it with its traceback
            self.queue.put(exc)

    def _produce(self) -> None:
        plan, chunk = self.plan, self.plan.chunk_images
        order = plan.rank_order(self.epoch)[self.start_micro * plan.micro_batch:]
        view_sets = block_view_sets(plan, self.epoch, self.store.views_per_image)
        order_blocks = order // chunk
        unused = np.bincount(order_blocks, minlength=plan.num_blocks)  # images of each block still to batch
        loaded: dict[int, dict[str, np.ndarray]] = {}  # block -> its arrays (its view set), until used up
        with ThreadPoolExecutor(self.read_threads, thread_name_prefix="dpal-store") as pool:
            pending: deque = deque()
            upcoming = iter(dict.fromkeys(order_blocks.tolist()))  # first-need order, each block once

            def keep_reads_in_flight():
                while len(pending) < self.read_ahead_blocks:
                    block = next(upcoming, None)
                    if block is None:
                        return
                    pending.append((block, pool.submit(self.store.read_block, block, int(view_sets[block]))))

            for micro, start in enumerate(range(0, len(order), plan.micro_batch), start=self.start_micro):
                images, blocks = order[start:start + plan.micro_batch], order_blocks[start:start + plan.micro_batch]
                needed, counts = np.unique(blocks, return_counts=True)
                for block in needed.tolist():
                    while block not in loaded:
                        keep_reads_in_flight()
                        done, future = pending.popleft()
                        loaded[done] = future.result()
                keep_reads_in_flight()
                batch = self._assemble(micro, images, blocks, needed, loaded)
                unused[needed] -= counts
                for block in needed[unused[needed] == 0].tolist():
                    del loaded[block]
                while not self._stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.5)
                        break
                    except Full:  # the trainer is busy; check for shutdown and retry
                        continue
                if self._stop.is_set():
                    return
        self.queue.put(None)

    def _assemble(self, micro: int, images: np.ndarray, blocks: np.ndarray, needed: np.ndarray,
                  loaded: dict[int, dict[str, np.ndarray]]) -> dict:
        """Gather the batch's rows into fresh (pinned) tensors: one fancy-indexed copy per block and array."""
        by_block = np.argsort(blocks, kind="stable")
        bounds = np.searchsorted(blocks[by_block], needed, side="right")
        groups = [(loaded[block], by_block[lo:hi], images[by_block[lo:hi]] - block * self.plan.chunk_images)
                  for block, lo, hi in zip(needed.tolist(), [0, *bounds[:-1].tolist()], bounds.tolist())]
        stacked = {}
        for name in self.arrays:
            sample = groups[0][0][name]
            tensor = torch.empty((len(images),) + sample.shape[1:], dtype=torch.from_numpy(sample[:0]).dtype,
                                 pin_memory=self.pin)
            out = tensor.numpy()
            for data, rows, offsets in groups:
                out[rows] = data[name][offsets]
            stacked[name] = tensor
        view_params = stacked.pop(VIEW_PARAMS_ARRAY)
        return {"indices": torch.from_numpy(images.astype(np.int64)), "view_params": view_params,
                "targets": self.store.targets(stacked),
                "local_params": local_crop_params(self.plan, self.cfg, self.epoch, micro),
                "backgrounds": self.backgrounds.used_by(view_params)}

    def get(self) -> dict | None:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except Empty:
                pass


def compute_threads(recorded: int | None) -> int:
    """torch's CPU threads for a run: the recorded count on resume (their number changes the float summation
    order of CPU kernels, so a resume keeps it), else this rank's share of the usable cores."""
    return recorded or max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class PlannedLoader(Loader):
    """FFCV loader over the images file in the plan's order (one rank, one micro-batch per iteration). `epoch`
    is the one place that positions FFCV's epoch counter, so any epoch starts at any of its micro-batches."""

    def __init__(self, images_path, plan: FeedPlan, *, workers: int):
        self.planned_order = PlannedOrder(plan)
        super().__init__(str(images_path), batch_size=plan.micro_batch, num_workers=workers,
                         order=self.planned_order, pipelines=image_pipelines(images_path), drop_last=True,
                         os_cache=True, batches_ahead=3)

    def epoch(self, epoch: int, start_micro: int = 0):
        """Batches (flat images, heights, widths) of `epoch`, after its first `start_micro` micro-batches."""
        self.planned_order.resume_at = (epoch, start_micro)
        self.next_epoch = epoch
        return iter(self)


def default_workers(device_arg: str) -> int:
    """FFCV decoding threads per rank: the cores left per rank on GPU machines, 1 when training on the CPU.

    Training on the CPU needs its cores for the model: FFCV's decoding threads competing with torch's
    made steps several times slower on a 2-core machine, and one decoding thread keeps up there."""
    if training_on_cpu(device_arg):
        return 1
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class CachedFeed:
    """Micro-batches of (images from FFCV, targets and view parameters from the store) for one rank."""

    def __init__(self, images_path, store, backgrounds: BackgroundPool, plan: FeedPlan, cfg: ViewConfig,
                 *, workers: int, pin: bool):
        self.store, self.backgrounds, self.plan, self.cfg, self.pin = store, backgrounds, plan, cfg, pin
        self.loader = PlannedLoader(images_path, plan, workers=workers)
        self.image_file = ImageFile(images_path)  # the recorded image sizes, for `check_pairing`

    def epoch(self, epoch: int, start_micro: int = 0):
        """Yield this rank's FeedBatches of `epoch`, starting after `start_micro` micro-batches."""
        prefetcher = TargetPrefetcher(self.store, self.plan, self.cfg, self.backgrounds, epoch, start_micro,
                                      pin=self.pin)
        try:
            for micro, (flat, heights, widths) in enumerate(self.loader.epoch(epoch, start_micro), start=start_micro):
                item = prefetcher.get()
                check_pairing(self.image_file, item["indices"], heights, widths, epoch, micro)
                yield FeedBatch(indices=item["indices"], images=unflatten_images(flat, heights, widths),
                                backgrounds=item["backgrounds"], view_params=item["view_params"],
                                local_params=item["local_params"], targets=item["targets"])
        finally:
            prefetcher.close()


class OnlineFeed:
    """Micro-batches for the online-teacher baseline: images from FFCV, fresh view sets at every step."""

    def __init__(self, images_path, backgrounds: BackgroundPool, plan: FeedPlan, cfg: ViewConfig, *,
                 workers: int):
        self.backgrounds, self.plan, self.cfg = backgrounds, plan, cfg
        self.loader = PlannedLoader(images_path, plan, workers=workers)
        self.image_file = ImageFile(images_path)  # the recorded image sizes, for `check_pairing`

    def epoch(self, epoch: int, start_micro: int = 0):
        order = self.plan.rank_order(epoch)
        for micro, (flat, heights, widths) in enumerate(self.loader.epoch(epoch, start_micro), start=start_micro):
            view_params = online_view_params(self.plan, self.cfg, epoch, micro, len(self.backgrounds))
            indices = torch.from_numpy(order[micro * self.plan.micro_batch:(micro + 1) * self.plan.micro_batch]
                                       .astype(np.int64))
            check_pairing(self.image_file, indices, heights, widths, epoch, micro)
            yield FeedBatch(indices=indices,
                            images=unflatten_images(flat, heights, widths),
                            backgrounds=self.backgrounds.used_by(view_params), view_params=view_params,
                            local_params=local_crop_params(self.plan, self.cfg, epoch, micro))
