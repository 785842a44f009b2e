"""The teacher side of a view set, one owner for both stages: what the teacher is shown, at which precision,
what it returns, the shape mask and its calibration, and the coding the store keeps.

`cache_teacher run` writes what `TeacherSide` computes, `verify` recomputes it, both benches time it and the
online baseline (`train_student.step.OnlineTeacher`) trains on it; so a store and the online baseline hold
the same targets for the same view sets, images and teacher (a test compares them bit for bit).

The rules kept here:
- precision: the teacher runs under bf16 autocast on CUDA and in float32 on the CPU (`teacher_precision`),
  whatever the student trains in; a store records it;
- calibration: the shape mask (and a compact store's token basis) is fitted on the global-view tokens of
  the first view set of a seeded sample of images (`TeacherSide.fit_calibration`); the online baseline,
  which stores nothing, calibrates as a one-view-set store of its images and seed would;
- background images are decoded once and kept when the pool fits in memory, else the most recently used
  (`BackgroundPool`).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch
from tqdm import tqdm

from dpal.config import ViewConfig, token_counts
from dpal.shape_mask import ShapeMaskCalibration, fit_shape_mask, shape_mask
from dpal.teachers import Teacher, TeacherTargets, global_view_targets, teacher_targets
from dpal.views import background_indices, render_view_sets
from formats.images import ImageFile
from formats.targets import CompactCoding, CompactTargets, Targets, encode_targets
from formats.view_records import calibration_indices, image_view_params

# The view sets per image the online baseline's calibration draws its records as (it stores none).
ONLINE_CALIBRATION_VIEWS_PER_IMAGE = 1


def teacher_precision(device: torch.device) -> str:
    """The dtype the teacher computes in on `device`: bf16 autocast on CUDA, float32 on the CPU."""
    return "bfloat16" if device.type == "cuda" else "float32"


class BackgroundPool:
    """Decoded background images by pool index (`pool[index]`, the background pool `render_view_sets` takes):
    all kept decoded when they fit `cache_bytes`, else the `recent_images` most recently used."""

    def __init__(self, path, cache_bytes: int = 2 << 30, recent_images: int = 4096):
        self.file = ImageFile(path)
        decoded_bytes = int((self.file.heights * self.file.widths * 3).sum())
        self._capacity = None if decoded_bytes <= cache_bytes else recent_images
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.file.num_images

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        with self._lock:
            if (image := self._cache.get(index)) is not None:
                self._cache.move_to_end(index)
                return image
        image = torch.from_numpy(self.file.image(index))
        with self._lock:
            self._cache[index] = image
            if self._capacity is not None and len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return image

    def used_by(self, view_params: torch.Tensor) -> dict[int, torch.Tensor]:
        """The decoded entries the view set records name, by pool index (each once)."""
        return {index: self[index] for index in background_indices(view_params).tolist()}


def first_view_sets(seed: int, indices: list[int], views_per_image: int, num_backgrounds: int,
                    cfg: ViewConfig) -> torch.Tensor:
    """[M, F]: the first of the `views_per_image` view sets a store of seed `seed` gives each image of `indices`."""
    return torch.stack([image_view_params(seed, i, views_per_image, num_backgrounds, cfg)[0] for i in indices])


class TeacherSide:
    """One teacher on one device: renders view sets, runs the teacher at its precision, and turns its outputs
    into float targets with their shape mask, or into the store's coding (`compact`: a compact store's
    coding, set once its basis is fitted). Works in batches of `batch_size` view sets."""

    def __init__(self, teacher: Teacher, backgrounds: BackgroundPool, cfg: ViewConfig, device: torch.device,
                 batch_size: int):
        self.teacher, self.backgrounds, self.cfg = teacher, backgrounds, cfg
        self.device, self.batch_size = device, batch_size
        self.compact: CompactCoding | None = None

    def render(self, images: list[torch.Tensor], params: torch.Tensor):
        return render_view_sets(images, self.backgrounds, params, self.cfg, device=self.device)

    def precision(self):
        """The autocast of `teacher_precision` (none on the CPU)."""
        return torch.autocast(self.device.type, dtype=getattr(torch, teacher_precision(self.device)),
                              enabled=self.device.type == "cuda")

    def run_teacher(self, global_view: torch.Tensor, crowd_view: torch.Tensor) -> TeacherTargets:
        """Teacher outputs (float32, on the device) of rendered views."""
        with self.precision():
            return teacher_targets(self.teacher, global_view, crowd_view)

    def targets(self, images: list[torch.Tensor], params: torch.Tensor) -> TeacherTargets:
        """Teacher outputs for view sets ``params`` of ``images`` (aligned lists)."""
        views = self.render(images, params)
        return self.run_teacher(views.global_view, views.crowd)

    def float_targets(self, out: TeacherTargets, calibration: ShapeMaskCalibration) -> Targets:
        """The teacher's outputs as float targets, with their shape mask: what the online baseline trains on."""
        return Targets(out.global_.float(), out.local.float(), shape_mask(out.local, calibration).float(),
                       out.relation.float())

    def encode(self, out: TeacherTargets, calibration: ShapeMaskCalibration,
               target_format: str) -> Targets | CompactTargets:
        """The teacher's outputs in the store's coding (`arrays()` gives what is written), on the device."""
        return encode_targets(global_=out.global_, local=out.local, mask=shape_mask(out.local, calibration),
                              relation=out.relation, target_format=target_format, compact=self.compact)

    def rendered_first_view_sets(self, images: ImageFile, indices: list[int], seed: int, views_per_image: int):
        """The views of `first_view_sets` of `indices`, one batch after the other."""
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start:start + self.batch_size]
            params = first_view_sets(seed, chunk, views_per_image, len(self.backgrounds), self.cfg)
            yield self.render([torch.from_numpy(images.image(i)) for i in chunk], params)

    def fit_calibration(self, images: ImageFile, *, num_images: int, count: int, seed: int, views_per_image: int,
                        progress: bool = False) -> tuple[ShapeMaskCalibration, torch.Tensor, list[int]]:
        """The shape-mask calibration of the first `num_images` of `images`, with the global-view patch tokens
        [M, N, D] it is fitted on (a compact store's token basis is fitted on them too) and the M images
        sampled: `count` of them (`calibration_indices`), each seen in its first stored view set."""
        indices = calibration_indices(num_images, count, seed)
        tokens = []
        for views in tqdm(self.rendered_first_view_sets(images, indices, seed, views_per_image),
                          total=math.ceil(len(indices) / self.batch_size), desc="shape-mask calibration",
                          unit="batch", disable=not progress):
            with self.precision():
                tokens.append(global_view_targets(self.teacher, views.global_view)[1].cpu())
        tokens = torch.cat(tokens)
        return fit_shape_mask(tokens, token_counts(self.teacher.spec, self.cfg)[0]), tokens, indices
