"""Rendering view sets and local crops from their records: planned on the host, executed on the device.

Rendering order per crop (torchvision's order): crop + resize (antialiased bicubic, flip folded in) ->
colour jitter in the stored op order -> grayscale -> Gaussian blur (13 taps, reflect borders) ->
solarize. The crowd canvas then gets the two persons blended in (``person_alpha`` person + rest
background), and every view is normalized with the ImageNet mean / std.

Numeric domain: float32 in [0, 1] from the uint8 decode (``x * (1/255)``, as torchvision's
``to_dtype``) to the final normalization, never re-quantized to uint8 between ops, i.e. exactly
torchvision's float-tensor semantics (each op clamps to [0, 1]; bicubic overshoot is clamped after
resizing). Re-quantizing after every op (torchvision's uint8 path) would turn float differences of
1e-7 between devices into whole 1/255 steps that compound through the ops; in float, CPU and CUDA
renders differ by float rounding only (bounded by a test at 1/255), and since the teacher sees the same
float view there is nothing to gain from quantizing.

Batching and exactness: a render call is planned on the host (``plan_view_sets``,
``plan_local_crops``: crop boxes, resize and blur weights, which colour op runs on which samples, all
staged in one buffer, pinned for CUDA) and executed on the device (``execute_view_sets``,
``execute_local_crops``) with no host round trip, so planning can run ahead on another thread. The
images of a call are packed into one uint8 buffer (``pack_images``, one transfer) and every crop of the
call is cut from it by one gather, grouped by crop size and zero-padded per group of 32 so that padding
stays small; resizing and blurring are separable linear maps applied as batched float32 matmuls with
per-sample weight matrices (weights in float64, PIL/PyTorch antialiased bicubic with a = -0.5; blur
kernels as torchvision's), with TF32 switched off around them (a process-wide flag: do not execute two
renders from two threads at once; planning is host-only and may. While a render-ahead thread renders, the
other threads' float32 matmuls see the flag too, which changes nothing unless TF32 was switched on). Colour ops, grayscale, solarize and
blending run on the whole batch with per-sample factors; the subsets an op applies to are picked by the
plan, so nothing waits on the device. The same records on the same device give bit-identical pixels; a
different batch composition changes padding and matmul blocking, which moves pixels by ~1e-7, far below
the CPU/CUDA tolerance of 1/255. The group matmul shapes are therefore part of the pixels: the device
work grows by three operators per 32 crops (a converting copy and two batched matmuls), everything else
is a fixed sequence per call.

Why a call still dispatches several hundred operators, not a few dozen: the colour pipeline is a fixed
sequence of ~70 operators per jitter position (the hue op alone ~45) times 4 positions, plus grayscale,
blur and solarize, per crop kind; and each group keeps its own matmuls. Merging groups into one padded
matmul changes the contraction length, and fusing the colour ops into one kernel changes where float
rounding happens (fused multiply-adds, the order of the contrast mean's reduction); either would move
pixels by ~1e-7 away from those the stores were cached with. The pixels are kept bit-identical instead.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch

from dpal.config import ViewConfig
from dpal.views.colour import JITTER_OPS, blur, blur_kernel_size, grayscale_rgb, normalize, solarize
from dpal.views.crops import apply_separable, blur_kernels, crop_boxes, resize_taps, resize_weights, separable_bmm
from dpal.views.records import (LOCAL_CROP_BLOCK, LOCAL_CROP_FIELDS, VIEW_SET_FIELDS, CropFields, ViewParamsError,
                                ViewSetFields, background_indices, check_view_params)
from dpal.views.staging import PackedImages, PlanTensors, StagedTensors, as_images, pack_images, to_rgb_uint8, upload

# Crops resized together (see render_crops).
_RESIZE_GROUP = 32


class RenderedViews(NamedTuple):
    global_view: torch.Tensor  # [n, 3, 256, 128] float32, normalized
    crowd: torch.Tensor  # [n, 3, 256, 256] float32, normalized



# ------------------------------------------------------------------------------------- render plans
#
# A render call is split in two: ``plan_*`` decides everything on the host from the records and the
# images' sizes (crop boxes, the crop gather, resize and blur weights, which colour op runs on which
# samples) and stages it as tensors in one byte buffer (pinned when the target is CUDA); ``execute_*``
# runs the device work from that plan with a fixed sequence of operators and no host round trip. A
# prefetcher can therefore plan (and upload) batch N+1 on another thread while step N computes.

class _ResizeGroup(NamedTuple):
    """Up to ``_RESIZE_GROUP`` crops of similar size, zero-padded to the group's largest crop."""
    rows: slice  # rows of the gathered crop pixels
    height: int  # padded crop height and width
    width: int
    # Flat ranges of the dense resize matrices, laid out as the two batched matmuls read them (one matrix per
    # crop and channel): rows [count * 3, out_h, height], columns transposed [count * 3, width, out_w].
    row_weights: slice
    col_weights: slice


class _ColourStep(NamedTuple):
    op: str  # key of _PLANNED_OPS
    index: int | None  # staged int64 sample index of the subset; None = every sample
    argument: int | None  # staged per-sample argument (factor, hue shift or blur kernel) of the subset


class _CropPlan(NamedTuple):
    count: int
    out_size: tuple[int, int]
    window: int  # crop pixels gathered per row: the widest crop of the call
    window_starts: int  # staged int64 [rows]: first pixel of each gathered row
    unsort: int  # staged int64 [count]: position of each crop in size order (the groups' order)
    groups: tuple[_ResizeGroup, ...]
    weight_count: int  # float32 cells of all groups' dense resize matrices
    weight_index: int  # staged int64 / float32: the nonzero cells and their weights
    weight_values: int
    colour: tuple[_ColourStep, ...]
    solarize_threshold: float


def _plan_colour(tensors: PlanTensors, blocks: torch.Tensor, cfg: ViewConfig) -> tuple[_ColourStep, ...]:
    """Colour jitter (stored op order), grayscale, blur, solarize: each op on the subset that has it.

    The subsets are picked here, on the host, so the device never waits to learn a subset's size; an
    op nobody has is dropped, an op everybody has runs on the whole batch.
    """
    steps = []

    def add(op: str, selected: torch.Tensor, argument: torch.Tensor | None = None, prepare=None) -> None:
        if not bool(selected.any()):
            return
        index = None
        if not bool(selected.all()):
            chosen = selected.nonzero().squeeze(1)
            index = tensors.add(chosen)
            argument = argument[chosen] if argument is not None else None
        if prepare is not None:  # computed from the subset's values only, as the op itself would
            argument = prepare(argument)
        steps.append(_ColourStep(op, index, tensors.add(argument) if argument is not None else None))

    fields = CropFields.of(blocks)
    jitter = fields.jitter > 0.5
    factors = fields.factors.float()
    order = fields.order.long()
    for step in range(4):
        for op_id, op in enumerate(JITTER_OPS):
            add(op.__name__, jitter & (order[:, step] == op_id), factors[:, op_id])
    add("grayscale", fields.gray > 0.5)
    sigma = fields.blur_sigma
    add("blur", sigma > 0, sigma, prepare=lambda sigmas: blur_kernels(sigmas, blur_kernel_size(cfg)))
    add("solarize", fields.solarize > 0.5)
    return tuple(steps)


def _plan_crops(tensors: PlanTensors, sources: PackedImages, source_index: torch.Tensor, blocks: torch.Tensor,
                out_size: tuple[int, int], aspect_range: tuple[float, float], cfg: ViewConfig) -> _CropPlan:
    """Plan crops ``[n, 3, *out_size]``: crop ``i`` cuts ``blocks[i]`` (aspects drawn from ``aspect_range``) from
    source ``source_index[i]``."""
    heights, widths = sources.heights[source_index], sources.widths[source_index]
    boxes = crop_boxes(blocks, heights, widths, aspect_range)
    tops, lefts, crop_h, crop_w = boxes.unbind(1)
    row_starts = sources.offsets[source_index] + tops * widths + lefts  # first pixel of each crop
    flips = CropFields.of(blocks).flip > 0.5
    # Resize in groups of similar crop size: padding to the largest crop of a group (wasted matmul work)
    # stays small. The group shapes are the matmul shapes, so they are what makes pixels bit-exact.
    by_size = torch.argsort(crop_h * crop_w, stable=True)
    out_h, out_w = out_size
    groups, window_starts, weight_index, weight_values = [], [], [], []
    rows = cells = 0
    for start in range(0, len(blocks), _RESIZE_GROUP):  # a loop over groups (n / 32), not over crops
        group = by_size[start:start + _RESIZE_GROUP]
        count = len(group)
        height, width = int(crop_h[group].max()), int(crop_w[group].max())
        # Row y of a crop is gathered from its source row (padding rows repeat its last row: the resize
        # weights of every padding row and column are exactly 0, so what they hold never matters).
        y = torch.arange(height).minimum(crop_h[group, None] - 1)
        window_starts.append((row_starts[group, None] + y * widths[group, None]).reshape(-1))
        # Each matrix block starts 512-byte aligned, as a fresh allocation would: BLAS kernels may be chosen
        # by pointer alignment, and the matmuls must be the ones the pixels were defined with.
        row_weights = slice(_aligned(cells), _aligned(cells) + count * 3 * out_h * height)
        col_weights = slice(_aligned(row_weights.stop), _aligned(row_weights.stop) + count * 3 * width * out_w)
        for weights, (index, weight), transposed in (
                (row_weights, resize_taps(crop_h[group], out_h, height), False),
                (col_weights, resize_taps(crop_w[group], out_w, width, flip=flips[group]), True)):
            in_len = height if weights is row_weights else width
            matrix = torch.arange(count)[:, None, None, None] * 3 + torch.arange(3)[:, None, None]  # [count, 3, 1, 1]
            out_index = torch.arange(index.shape[1])[:, None]  # [out, 1]
            cell = (matrix * in_len + index[:, None]) * out_w + out_index if transposed \
                else (matrix * index.shape[1] + out_index) * in_len + index[:, None]
            inside = (index < in_len)[:, None].expand_as(cell)  # scratch-column taps (weight 0) are left out
            weight_index.append(weights.start + cell[inside])
            weight_values.append(weight.float()[:, None].expand_as(cell)[inside])
        groups.append(_ResizeGroup(slice(rows, rows + count * height), height, width, row_weights, col_weights))
        rows, cells = rows + count * height, col_weights.stop
    return _CropPlan(
        count=len(blocks), out_size=out_size, window=int(crop_w.max()),
        window_starts=tensors.add(torch.cat(window_starts)), unsort=tensors.add(torch.argsort(by_size)),
        groups=tuple(groups), weight_count=cells, weight_index=tensors.add(torch.cat(weight_index)),
        weight_values=tensors.add(torch.cat(weight_values)), colour=_plan_colour(tensors, blocks, cfg),
        solarize_threshold=cfg.solarize_threshold / 255.0)


_ALIGN_FLOATS = 128


def _aligned(cells: int) -> int:
    return -(-cells // _ALIGN_FLOATS) * _ALIGN_FLOATS


_PLANNED_OPS = {op.__name__: op for op in JITTER_OPS} | {"grayscale": grayscale_rgb, "blur": blur}


def _execute_crops(pixels: torch.Tensor, plan: _CropPlan, staged: StagedTensors) -> torch.Tensor:
    """Crops ``[n, 3, h, w]`` in [0, 1] (not normalized): one gather, the group matmuls, the colour ops."""
    device = pixels.device
    # One gather for every crop of the call: overlapping windows of ``window`` pixels, one per row start.
    flat = pixels.reshape(-1)
    windows = flat.as_strided((len(pixels) - plan.window + 1, plan.window * 3), (3, 1))
    gathered = windows[staged[plan.window_starts]]  # [rows, window * 3]
    dense = torch.zeros(plan.weight_count, dtype=torch.float32, device=device)
    dense.put_(staged[plan.weight_index], staged[plan.weight_values])
    out_h, out_w = plan.out_size
    resized = []
    for group in plan.groups:  # a loop over groups (n / 32): their padded shapes fix the matmul shapes
        count = (group.rows.stop - group.rows.start) // group.height
        crops = gathered[group.rows].view(count, group.height, plan.window, 3)[:, :, :group.width]
        x = torch.empty(count * 3, group.height, group.width, dtype=torch.float32, device=device)
        torch.mul(crops.permute(0, 3, 1, 2), 1.0 / 255, out=x.view(count, 3, group.height, group.width))
        rows = dense[group.row_weights].view(count * 3, out_h, group.height)
        cols_t = dense[group.col_weights].view(count * 3, group.width, out_w)
        resized.append(separable_bmm(x, rows, cols_t))
    x = torch.cat(resized).view(plan.count, 3, out_h, out_w)[staged[plan.unsort]]
    x.clamp_(0.0, 1.0)  # bicubic overshoots
    for step in plan.colour:
        op = (functools.partial(solarize, threshold=plan.solarize_threshold) if step.op == "solarize"
              else _PLANNED_OPS[step.op])
        arguments = () if step.argument is None else (staged[step.argument],)
        if step.index is None:
            x = op(x, *arguments)
        else:
            # Advanced indexing, not index_select / index_copy: several times faster on CPU, same on CUDA.
            index = staged[step.index]
            x[index] = op(x[index], *arguments)
    return x


class RenderPlan(NamedTuple):
    """Everything one render call does, decided on the host: staged tensors plus the shape of the work.

    Build with ``plan_view_sets`` / ``plan_local_crops`` (host only, no device), move with ``to`` (one
    copy), run with ``execute_view_sets`` / ``execute_local_crops`` on the packed images' device. A
    prefetcher that copies plan and pixels on a side stream makes the render stream wait on an event
    after the copy and calls ``record_stream`` on both device buffers, as for any cross-stream tensor.
    """
    staged: StagedTensors
    crops: tuple[_CropPlan, ...]  # view sets: global, first person, canvas; local crops: one
    paste: int | None  # staged int64 [n, 4] paste positions (view sets)
    num_local: int
    cfg: ViewConfig

    def to(self, device, non_blocking: bool = False) -> "RenderPlan":
        return self._replace(staged=self.staged.to(device, non_blocking=non_blocking))


def _check_sources(sources: PackedImages, n: int, what: str, records: str) -> None:
    if len(sources.offsets) != n:
        raise ValueError(f"{n} {records} records need {n} {what}, got {len(sources.offsets)} {what}")


def plan_view_sets(images: PackedImages, backgrounds: PackedImages, params, cfg: ViewConfig = ViewConfig(),
                   pin_memory: bool = False) -> RenderPlan:
    """Plan ``render_view_sets`` on the host: crop ``i`` reads ``images`` entry ``i`` and ``backgrounds``
    entry ``i`` (both may be selections of one ``PackedImages``). ``pin_memory`` for a CUDA target."""
    params = check_view_params(params)
    if params.ndim != 2 or len(params) == 0:
        raise ViewParamsError(f"view set parameters must be [n >= 1, {VIEW_SET_FIELDS}], got {tuple(params.shape)}")
    n = len(params)
    _check_sources(images, n, "images", "view set")
    _check_sources(backgrounds, n, "backgrounds", "view set")
    records = ViewSetFields.of(params.double())
    tensors = PlanTensors()
    every = torch.arange(n)
    crops = (_plan_crops(tensors, images, every, records.global_view, cfg.global_size, cfg.person_aspect, cfg),
             _plan_crops(tensors, images, every, records.person, cfg.local_size, cfg.person_aspect, cfg),
             _plan_crops(tensors, backgrounds, every, records.background, cfg.crowd_size, cfg.background_aspect,
                         cfg))
    paste = tensors.add(records.paste.long())
    return RenderPlan(StagedTensors.stage(tensors.tensors, pin_memory), crops, paste, 0, cfg)


def plan_local_crops(images: PackedImages, params, cfg: ViewConfig = ViewConfig(),
                     pin_memory: bool = False) -> RenderPlan:
    """Plan ``render_local_crops`` on the host (``params`` ``[n, num_local, LOCAL_CROP_FIELDS]``, n >= 1)."""
    params = check_view_params(params, LOCAL_CROP_FIELDS, "local crop")
    if params.ndim != 3 or params.shape[0] * params.shape[1] == 0:
        raise ViewParamsError(f"local crop parameters must be [n >= 1, num_local >= 1, {LOCAL_CROP_FIELDS}], "
                              f"got {tuple(params.shape)}")
    n, num_local = params.shape[:2]
    _check_sources(images, n, "images", "local crop")
    tensors = PlanTensors()
    crops = _plan_crops(tensors, images, torch.arange(n).repeat_interleave(num_local),
                        params.reshape(n * num_local, -1)[:, LOCAL_CROP_BLOCK].double(), cfg.local_size, cfg.person_aspect, cfg)
    return RenderPlan(StagedTensors.stage(tensors.tensors, pin_memory), (crops,), None, num_local, cfg)


@functools.lru_cache(maxsize=8)
def _second_person_weights(cfg: ViewConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The global view shrunk to a person-sized patch: the same two matrices for every batch."""
    (global_h, global_w), (local_h, local_w) = cfg.global_size, cfg.local_size
    return (resize_weights(torch.tensor([global_h]), local_h, global_h, device),
            resize_weights(torch.tensor([global_w]), local_w, global_w, device))


def execute_view_sets(pixels: torch.Tensor, plan: RenderPlan) -> RenderedViews:
    """Run a ``plan_view_sets`` plan on ``pixels`` (its ``PackedImages.pixels``, on the plan's device)."""
    staged, cfg = plan.staged, plan.cfg
    global_view, first_person, canvas = (_execute_crops(pixels, crops, staged) for crops in plan.crops)
    # The second person is the global view itself, shrunk to a person-sized patch.
    second_person = apply_separable(global_view, *_second_person_weights(cfg, pixels.device)).clamp_(0.0, 1.0)
    crowd = paste_persons(canvas, [first_person, second_person], staged[plan.paste], cfg.person_alpha)
    return RenderedViews(normalize(global_view, cfg), normalize(crowd, cfg))


def execute_local_crops(pixels: torch.Tensor, plan: RenderPlan) -> torch.Tensor:
    """Run a ``plan_local_crops`` plan: normalized crops ``[n, num_local, 3, *local_size]``."""
    crops = normalize(_execute_crops(pixels, plan.crops[0], plan.staged), plan.cfg)
    return crops.reshape(-1, plan.num_local, 3, *plan.cfg.local_size)


# ----------------------------------------------------------------------------------- render calls

def _render_device(images: Sequence, device) -> torch.device:
    """The device to render on: ``device``, else the images' own."""
    if device is not None:
        return torch.device(device)
    return images[0].device if isinstance(images[0], torch.Tensor) else torch.device("cpu")


def _pool_entry(pool, index: int) -> torch.Tensor:
    try:
        if index < 0:
            raise IndexError(index)
        image = pool[index]
    except (IndexError, KeyError):
        raise ValueError(f"a view set record names background {index}, which the background pool "
                         f"({len(pool)} images) does not hold: the records were drawn for another pool") from None
    try:
        return to_rgb_uint8(image)
    except ValueError as error:
        raise ValueError(f"background {index}: {error}") from None


def pack_view_set_images(images: Sequence, pool, params,
                         pin_memory: bool = False) -> tuple[PackedImages, PackedImages, PackedImages]:
    """The images a view set render reads, packed into one buffer: (the whole buffer, the person images, each
    view set's background), the last two for ``plan_view_sets``.

    The background of view set ``i`` is ``pool[index]``, ``index`` being its record's ``background_index``:
    ``pool`` is the background pool, or the part of it the records use, indexed by pool index (a list, a dict
    of decoded entries, anything with ``[index]``). A background several view sets use is packed once.
    """
    indices = background_indices(params).tolist()
    used = list(dict.fromkeys(indices))  # the pool entries the records name, in first-use order
    images = as_images(images, "images")
    packed = pack_images(images + [_pool_entry(pool, index) for index in used], pin_memory=pin_memory)
    position = {index: len(images) + k for k, index in enumerate(used)}
    return packed, packed.select(0, len(images)), packed.take(torch.tensor([position[i] for i in indices]))


def render_crops(images: Sequence[torch.Tensor], blocks: torch.Tensor, out_size: tuple[int, int],
                 aspect_range: tuple[float, float], cfg: ViewConfig, device: torch.device) -> torch.Tensor:
    """Crops ``[n, 3, h, w]`` in [0, 1] (not normalized) of RGB uint8 images, one crop block each (aspects
    drawn from ``aspect_range``)."""
    device = _render_device(images, device)
    on_cuda = device.type == "cuda"
    packed = pack_images(images, pin_memory=on_cuda).to(device, non_blocking=on_cuda)
    tensors = PlanTensors()
    crops = _plan_crops(tensors, packed, torch.arange(len(blocks)), blocks.double(), out_size, aspect_range, cfg)
    staged = StagedTensors.stage(tensors.tensors, on_cuda).to(device, non_blocking=True)
    return _execute_crops(packed.pixels, crops, staged)


def paste_persons(canvas: torch.Tensor, persons: Sequence[torch.Tensor], positions: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """Blend ``alpha * person + (1 - alpha) * canvas`` at per-sample (y, x) positions ``[n, 2 * len(persons)]``."""
    canvas = canvas.clone()
    batch = torch.arange(len(canvas), device=canvas.device)[:, None, None]
    positions = upload(positions.long(), canvas.device)
    for k, person in enumerate(persons):
        rows = positions[:, 2 * k, None] + torch.arange(person.shape[-2], device=canvas.device)  # [n, h]
        cols = positions[:, 2 * k + 1, None] + torch.arange(person.shape[-1], device=canvas.device)  # [n, w]
        where = (batch, slice(None), rows[:, :, None], cols[:, None, :])  # picks [n, h, w, C]
        region = canvas[where]
        canvas[where] = person.permute(0, 2, 3, 1) * alpha + region * (1.0 - alpha)
    return canvas



def render_view_sets(images: Sequence, pool, params, cfg: ViewConfig = ViewConfig(),
                     device=None) -> RenderedViews:
    """Render view sets: the normalized global views ``[n, 3, 256, 128]`` and crowd views ``[n, 3, 256, 256]``.

    ``images[i]`` is the person image of view set ``i``; its background is ``pool[index]``, ``index`` being the
    record's ``background_index`` (``pool``: the background pool or the entries of it the records use, see
    ``pack_view_set_images``). Images are uint8 ``[H, W, C]`` (any size; grey/RGBA are converted). ``device``
    defaults to the images' device. Pure: no randomness, no state. The same as ``plan_view_sets`` then
    ``execute_view_sets`` on the images packed by ``pack_view_set_images``.
    """
    params = check_view_params(params)
    if params.ndim != 2:
        raise ViewParamsError(f"view set parameters must be [n, {VIEW_SET_FIELDS}], got {tuple(params.shape)}")
    n = len(params)
    if n == 0:
        dev = torch.device(device or "cpu")
        return RenderedViews(torch.zeros(0, 3, *cfg.global_size, device=dev),
                             torch.zeros(0, 3, *cfg.crowd_size, device=dev))
    if len(pool) == 0:
        raise ValueError("the background pool is empty: render_view_sets needs the background each record names")
    if len(images) != n:
        raise ValueError(f"{n} view set records need {n} images, got {len(images)} images")
    device = _render_device(images, device)
    on_cuda = device.type == "cuda"  # a non-blocking copy to the host could be read before it lands
    packed, persons, backgrounds = pack_view_set_images(images, pool, params, pin_memory=on_cuda)
    plan = plan_view_sets(persons, backgrounds, params, cfg, on_cuda)
    return execute_view_sets(packed.pixels.to(device, non_blocking=on_cuda), plan.to(device, non_blocking=True))


def render_local_crops(images: Sequence, params, cfg: ViewConfig = ViewConfig(), device=None) -> torch.Tensor:
    """Normalized local crops ``[n, num_local, 3, 128, 96]`` of ``images`` from ``sample_local_crops`` records.

    The same as ``plan_local_crops`` then ``execute_local_crops``.
    """
    params = check_view_params(params, LOCAL_CROP_FIELDS, "local crop")
    if params.ndim != 3:
        raise ViewParamsError(f"local crop parameters must be [n, num_local, {LOCAL_CROP_FIELDS}], "
                              f"got {tuple(params.shape)}")
    n, num_local = params.shape[:2]
    if len(images) != n:
        raise ValueError(f"{n} local crop records need {n} images, got {len(images)}")
    if n * num_local == 0:
        return torch.zeros(n, num_local, 3, *cfg.local_size, device=torch.device(device or "cpu"))
    device = _render_device(images, device)
    on_cuda = device.type == "cuda"
    packed = pack_images(images, pin_memory=on_cuda)
    plan = plan_local_crops(packed, params, cfg, on_cuda)
    return execute_local_crops(packed.pixels.to(device, non_blocking=on_cuda), plan.to(device, non_blocking=True))
