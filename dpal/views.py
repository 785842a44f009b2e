"""View sets as data: every random decision of docs/method.md section 3 is sampled once into a float32
record, and the pixels are a pure, batched function of (image, background, record).

The teacher is run on exactly what ``render_view_sets`` returns, and the trainer calls the same function
on the same records to rebuild the same pixels; a cached target is never flipped or re-cropped.

Record layout (``VIEW_PARAMS_VERSION`` = 2)
-------------------------------------------
Each rendered crop (the global view, the crowd view's background, the crowd view's first pasted person,
every local crop) is described by one 35-field *crop block*:

====  ============  ====================================================================================
 off  field         meaning
====  ============  ====================================================================================
 0+k  scale_k       area fraction of RandomResizedCrop's try k = 0..9, U(scale) (float32, as torchvision)
10+k  aspect_k      aspect (w/h) of try k = 0..9, exp(U(log r_min, log r_max))
  20  pos_y         uniform in [0, 1) on a 2**-24 grid: top = floor(pos_y * (H - h + 1))
  21  pos_x         ... left = floor(pos_x * (W - w + 1))
  22  flip          1 = mirror horizontally (after resizing)
  23  jitter        1 = colour jitter applied (else the factors hold the neutral 1, 1, 1, 0)
  24  brightness    brightness factor
  25  contrast      contrast factor
  26  saturation    saturation factor
  27  hue           hue shift in turns
  28  order_0       jitter op applied first (0 brightness, 1 contrast, 2 saturation, 3 hue)
  29  order_1       ... second
  30  order_2       ... third
  31  order_3       ... fourth
  32  gray          1 = converted to 3-channel grayscale (after the jitter)
  33  blur_sigma    Gaussian blur sigma in pixels of the rendered crop; 0 = no blur
  34  solarize      1 = solarized (crowd background only; always 0 elsewhere)
====  ============  ====================================================================================

A *view set* record (``VIEW_SET_FIELDS`` = 111 float32, 444 bytes; names in ``VIEW_SET_FIELD_NAMES``):

======  ==================  ========================================================================
 index  field               meaning
======  ==================  ========================================================================
     0  version             ``VIEW_PARAMS_VERSION``
  1-35  global.*            crop block of the 256x128 global view, cut from the person image
 36-70  background.*        crop block of the 256x256 crowd canvas, cut from the background image
71-105  person.*            crop block of the first pasted person: a 128x96 local-style crop of the
                            same person image, drawn for the crowd view
   106  background_index    index into the background pool
   107  paste_y1            top of the first person on the canvas, pixels, in [0, 126]
   108  paste_x1            left of the first person
   109  paste_y2            top of the second person (the global view resized to 128x96),
                            drawn independently of paste_y1
   110  paste_x2            left of the second person, in [paste_x1 + 96, 158]
======  ==================  ========================================================================

A *local crop* record (``LOCAL_CROP_FIELDS`` = 36, 144 bytes): ``version`` then one crop block. Local crops
are drawn fresh every epoch (``sample_local_crops``) and never stored. (Version 1 records were 57 and 18
fields, 228 and 72 bytes: one (area, aspect) draw and two position fractions per crop.)

Crop boxes (``crop_boxes``) follow torchvision's ``RandomResizedCrop.get_params`` exactly, resolved on each
source image's own size H x W when rendering (the sampler never sees the image): try k gives
w = round(sqrt(H*W*scale_k*aspect_k)), h = round(sqrt(H*W*scale_k/aspect_k)) in float64 from the stored
float32 values, and the first try with 0 < w <= W and 0 < h <= H is the box, placed at
``floor(pos * (free range + 1))``, every integer position equally likely. If no try fits, the box is
torchvision's centre crop with the image's aspect clamped to the crop kind's aspect range, taken from the
``ViewConfig`` as float64 (as torchvision takes the range it was given). A box is never shrunk to fit.
The same record and image size give the same integer box on any machine (IEEE float64 arithmetic on the
host), so a render on the GPU cuts exactly the box the cache stage cut.

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
import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

from dpal.config import ViewConfig

VIEW_PARAMS_VERSION = 2
# Why records of an older version cannot be rendered by this code (DPAL_SPEC.md "Revisions"), for the refusal.
STALE_VIEW_RECORDS = {1: "crop boxes of spec v2: a box that does not fit shrunk instead of redrawn, positions "
                         "rounded, not torchvision's RandomResizedCrop draw of spec v3"}

# RandomResizedCrop's (area, aspect) tries before its centre-crop fallback (torchvision's fixed count).
CROP_TRIES = 10
CROP_BLOCK_NAMES = (
    tuple(f"scale_{k}" for k in range(CROP_TRIES)) + tuple(f"aspect_{k}" for k in range(CROP_TRIES))
    + ("pos_y", "pos_x", "flip", "jitter", "brightness", "contrast", "saturation", "hue",
       "order_0", "order_1", "order_2", "order_3", "gray", "blur_sigma", "solarize")
)
_SCALES = slice(0, CROP_TRIES)
_ASPECTS = slice(CROP_TRIES, 2 * CROP_TRIES)
_POS_Y, _POS_X, _FLIP, _JITTER = range(2 * CROP_TRIES, 2 * CROP_TRIES + 4)
_FACTORS = slice(_JITTER + 1, _JITTER + 5)  # brightness, contrast, saturation, hue
_ORDER = slice(_FACTORS.stop, _FACTORS.stop + 4)
_GRAY, _BLUR_SIGMA, _SOLARIZE = range(_ORDER.stop, _ORDER.stop + 3)
# Positions are drawn on this grid: exact in float32, so floor(pos * range) never reaches the range.
_POSITION_STEPS = 2**24
CROP_BLOCK_FIELDS = len(CROP_BLOCK_NAMES)

VIEW_SET_FIELD_NAMES = (
    ("version",)
    + tuple(f"global.{name}" for name in CROP_BLOCK_NAMES)
    + tuple(f"background.{name}" for name in CROP_BLOCK_NAMES)
    + tuple(f"person.{name}" for name in CROP_BLOCK_NAMES)
    + ("background_index", "paste_y1", "paste_x1", "paste_y2", "paste_x2")
)
VIEW_SET_FIELDS = len(VIEW_SET_FIELD_NAMES)
_GLOBAL_BLOCK = slice(1, 1 + CROP_BLOCK_FIELDS)
_BACKGROUND_BLOCK = slice(_GLOBAL_BLOCK.stop, _GLOBAL_BLOCK.stop + CROP_BLOCK_FIELDS)
_PERSON_BLOCK = slice(_BACKGROUND_BLOCK.stop, _BACKGROUND_BLOCK.stop + CROP_BLOCK_FIELDS)
_BACKGROUND_INDEX = _PERSON_BLOCK.stop
_PASTE = slice(_BACKGROUND_INDEX + 1, _BACKGROUND_INDEX + 5)  # y1, x1, y2, x2

LOCAL_CROP_FIELD_NAMES = ("version",) + CROP_BLOCK_NAMES
LOCAL_CROP_FIELDS = len(LOCAL_CROP_FIELD_NAMES)

# float32 holds every integer up to 2**24 exactly; a larger pool index would be silently rounded.
_MAX_BACKGROUNDS = 2**24
# Crops resized together (see render_crops).
_RESIZE_GROUP = 32
# PIL / PyTorch antialiased bicubic uses a = -0.5 (the non-antialiased path uses -0.75).
_CUBIC_A = -0.5


class ViewParamsError(ValueError):
    """A view parameter record that this code cannot render (wrong version, shape or content)."""


class RenderedViews(NamedTuple):
    global_view: torch.Tensor  # [n, 3, 256, 128] float32, normalized
    crowd: torch.Tensor  # [n, 3, 256, 256] float32, normalized


# ----------------------------------------------------------------------------------------- inputs

def to_rgb_uint8(array) -> torch.Tensor:
    """A decoded image (numpy array or tensor) as a uint8 ``[H, W, 3]`` tensor.

    Grey ``[H, W]`` / ``[H, W, 1]`` is repeated to three channels; RGBA drops alpha (as PIL's
    ``convert('RGB')``); RGB is returned as is (no copy).
    """
    if not isinstance(array, torch.Tensor):
        array = np.asarray(array)
        # Read-only buffers (PIL, memory maps) are copied: torch cannot wrap them safely.
        array = torch.from_numpy(array if array.flags.writeable else array.copy())
    image = array
    if image.dtype != torch.uint8:
        raise ValueError(f"image must be uint8 (decoded 8-bit pixels), got dtype {image.dtype} "
                         f"with shape {tuple(image.shape)}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (grey, RGB, RGBA), "
                         f"got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty (shape {tuple(image.shape)}): it was not decoded")
    if image.shape[2] == 1:
        return image.expand(-1, -1, 3)
    return image[:, :, :3]


def check_view_params(params, fields: int = VIEW_SET_FIELDS, what: str = "view set") -> torch.Tensor:
    """``params`` as a float32 CPU tensor ``[..., fields]`` after checking its version and width (the version
    first: a record of another version has another width, and the version says why it cannot be used).

    Raises ``ViewParamsError`` naming the problem (and what to do) otherwise.
    """
    params = torch.as_tensor(params).detach().cpu()
    versions = params[..., 0] if params.ndim >= 1 and params.shape[-1] >= 1 else params.new_zeros(0)
    if versions.numel() and not bool((versions == VIEW_PARAMS_VERSION).all()):
        found = sorted({float(v) for v in versions.unique()[:5]})
        why = "; ".join(STALE_VIEW_RECORDS[int(v)] for v in found if v in STALE_VIEW_RECORDS)
        raise ViewParamsError(
            f"{what} parameters have record version {found}" + (f" ({why})" if why else "")
            + f", this code renders version {VIEW_PARAMS_VERSION}: re-create them with this version of "
            f"dpal.views (for a target store, rebuild it with `python -m cache_teacher run` into a new --out)")
    if params.ndim < 1 or params.shape[-1] != fields:
        raise ViewParamsError(
            f"{what} parameters must have {fields} float32 fields in the last axis (record version "
            f"{VIEW_PARAMS_VERSION}), got shape {tuple(params.shape)}")
    if params.dtype != torch.float32:
        raise ViewParamsError(f"{what} parameters must be float32, got {params.dtype}")
    if not bool(torch.isfinite(params).all()):
        raise ViewParamsError(f"{what} parameters contain NaN or infinite values")
    return params


def background_indices(params) -> torch.Tensor:
    """Index into the background pool of each view set: LongTensor ``[n]``."""
    params = check_view_params(params)
    return params[:, _BACKGROUND_INDEX].long()


# --------------------------------------------------------------------------------------- sampling

def _uniform(u: torch.Tensor, bounds: Sequence[float]) -> torch.Tensor:
    return bounds[0] + u * (bounds[1] - bounds[0])


def _sample_crop_blocks(generator: torch.Generator, n: int, cfg: ViewConfig, *, scale, aspect,
                        blur_p: float, solarize_p: float = 0.0) -> torch.Tensor:
    """``n`` crop blocks (float64 ``[n, CROP_BLOCK_FIELDS]``): RandomResizedCrop's tries and position, flip,
    jitter, grayscale, blur, solarize. Every try is drawn, since which one fits depends on the image's size."""
    u = torch.rand(n, 12, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    order = torch.rand(n, 4, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    tries = torch.rand(n, 2, CROP_TRIES, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    block = torch.zeros(n, CROP_BLOCK_FIELDS, dtype=torch.float64)
    block[:, _SCALES] = _uniform(tries[:, 0], scale)
    block[:, _ASPECTS] = torch.exp(_uniform(tries[:, 1], (math.log(aspect[0]), math.log(aspect[1]))))
    block[:, [_POS_Y, _POS_X]] = torch.floor(u[:, 0:2] * _POSITION_STEPS) / _POSITION_STEPS
    block[:, _FLIP] = (u[:, 2] < cfg.flip_p).double()
    jitter = u[:, 3] < cfg.jitter_p
    brightness, contrast, saturation, hue = cfg.jitter
    factors = torch.stack([
        _uniform(u[:, 4], (max(0.0, 1 - brightness), 1 + brightness)),
        _uniform(u[:, 5], (max(0.0, 1 - contrast), 1 + contrast)),
        _uniform(u[:, 6], (max(0.0, 1 - saturation), 1 + saturation)),
        _uniform(u[:, 7], (-hue, hue)),
    ], dim=1)
    neutral = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    block[:, _JITTER] = jitter.double()
    block[:, _FACTORS] = torch.where(jitter[:, None], factors, neutral)
    block[:, _ORDER] = order.argsort(dim=1).double()  # a uniform random permutation, like randperm
    block[:, _GRAY] = (u[:, 8] < cfg.gray_p).double()
    block[:, _BLUR_SIGMA] = torch.where(u[:, 9] < blur_p, _uniform(u[:, 10], cfg.blur_sigma), 0.0)
    block[:, _SOLARIZE] = (u[:, 11] < solarize_p).double()
    return block


def _check_canvas_geometry(cfg: ViewConfig) -> None:
    canvas_h, canvas_w = cfg.crowd_size
    person_h, person_w = cfg.local_size
    problems = []
    if cfg.paste_y[0] < 0 or cfg.paste_y[1] + person_h > canvas_h:
        problems.append(f"paste_y {cfg.paste_y} puts a {person_h}-high person outside the {canvas_h}-high canvas")
    if cfg.first_person_x[0] < 0 or cfg.first_person_x[1] + person_w > cfg.second_person_x_max:
        problems.append(f"first_person_x {cfg.first_person_x} leaves no room for the second person "
                        f"before second_person_x_max {cfg.second_person_x_max}")
    if cfg.second_person_x_max + person_w > canvas_w:
        problems.append(f"second_person_x_max {cfg.second_person_x_max} puts the second person outside "
                        f"the {canvas_w}-wide canvas")
    if problems:
        raise ValueError("ViewConfig crowd geometry is invalid: " + "; ".join(problems))


def _randint(u: torch.Tensor, low: torch.Tensor | int, high: torch.Tensor | int) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive) from uniforms in [0, 1)."""
    return low + torch.floor(u * (torch.as_tensor(high) - low + 1)).clamp_(max=torch.as_tensor(high) - low)


def sample_view_sets(generator: torch.Generator, n: int, *, num_backgrounds: int,
                     cfg: ViewConfig = ViewConfig()) -> torch.Tensor:
    """Draw ``n`` view sets (global view + crowd view) as float32 records ``[n, VIEW_SET_FIELDS]`` (CPU).

    Every random decision comes from ``generator``: the same generator state gives the same records.
    """
    if num_backgrounds < 1:
        raise ValueError("the background pool is empty: the crowd view needs at least one background "
                         "image (num_backgrounds >= 1)")
    if num_backgrounds > _MAX_BACKGROUNDS:
        raise ValueError(f"num_backgrounds {num_backgrounds} exceeds {_MAX_BACKGROUNDS}, the largest pool "
                         f"a float32 record indexes exactly")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_canvas_geometry(cfg)
    global_ = _sample_crop_blocks(generator, n, cfg, scale=cfg.global_scale, aspect=cfg.person_aspect,
                                  blur_p=cfg.global_blur_p)
    background = _sample_crop_blocks(generator, n, cfg, scale=cfg.background_scale,
                                     aspect=cfg.background_aspect, blur_p=cfg.background_blur_p,
                                     solarize_p=cfg.background_solarize_p)
    person = _sample_crop_blocks(generator, n, cfg, scale=cfg.local_scale, aspect=cfg.person_aspect,
                                 blur_p=cfg.local_blur_p)
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    person_w = cfg.local_size[1]
    records = torch.zeros(n, VIEW_SET_FIELDS, dtype=torch.float64)
    records[:, 0] = VIEW_PARAMS_VERSION
    records[:, _GLOBAL_BLOCK] = global_
    records[:, _BACKGROUND_BLOCK] = background
    records[:, _PERSON_BLOCK] = person
    records[:, _BACKGROUND_INDEX] = _randint(u[:, 0], 0, num_backgrounds - 1)
    x1 = _randint(u[:, 2], *cfg.first_person_x)
    records[:, _PASTE] = torch.stack([
        _randint(u[:, 1], *cfg.paste_y), x1,
        _randint(u[:, 3], *cfg.paste_y), _randint(u[:, 4], x1 + person_w, cfg.second_person_x_max),
    ], dim=1)
    return records.float()


def sample_local_crops(generator: torch.Generator, n: int, cfg: ViewConfig = ViewConfig()) -> torch.Tensor:
    """Draw ``cfg.num_local`` local crops for each of ``n`` images: float32 ``[n, num_local, LOCAL_CROP_FIELDS]``."""
    blocks = _sample_crop_blocks(generator, n * cfg.num_local, cfg, scale=cfg.local_scale,
                                 aspect=cfg.person_aspect, blur_p=cfg.local_blur_p)
    records = torch.cat([torch.full((len(blocks), 1), float(VIEW_PARAMS_VERSION), dtype=torch.float64),
                         blocks], dim=1)
    return records.float().reshape(n, cfg.num_local, LOCAL_CROP_FIELDS)


# ------------------------------------------------------------------------------------- geometry

def _upload(tensor: torch.Tensor, device) -> torch.Tensor:
    """Host -> device without blocking the host.

    A copy from pageable memory may synchronize the stream; render issues dozens of small uploads
    (weights, indices, factors), so they go through pinned staging memory and never stall the queue.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)



def crop_tries(blocks: torch.Tensor, heights: torch.Tensor,
               widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's tries on sources of the given sizes: the try taken (int64 ``[n]``, the first that
    fits, -1 = none fits: the centre-crop fallback) and every try's height and width (float64 ``[n, tries]``).

    As torchvision: target area = H * W * scale, w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect))
    (float64, round half to even like Python's ``round``), fitting when 0 < w <= W and 0 < h <= H.
    """
    blocks = blocks.double()
    heights, widths = heights.double()[:, None], widths.double()[:, None]
    area = heights * widths * blocks[:, _SCALES]
    aspect = blocks[:, _ASPECTS]
    tries_w, tries_h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (tries_w > 0) & (tries_w <= widths) & (tries_h > 0) & (tries_h <= heights)
    taken = torch.where(fits.any(dim=1), fits.byte().argmax(dim=1), -1)  # argmax: the first of the maxima
    return taken, tries_h, tries_w


def crop_boxes(blocks: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
               aspect_range: tuple[float, float]) -> torch.Tensor:
    """Pixel boxes ``[n, 4]`` (top, left, height, width; int64) of crop blocks on sources of the given sizes,
    exactly as torchvision's ``RandomResizedCrop.get_params`` (DPAL_SPEC.md section 3).

    The first fitting try (``crop_tries``) at ``floor(pos * (free range + 1))``; if none fits, the centre crop
    whose aspect is the image's clamped to ``aspect_range`` (the range the crop kind's aspects were drawn
    from, e.g. ``ViewConfig.person_aspect``).
    """
    blocks = blocks.double()
    taken, tries_h, tries_w = crop_tries(blocks, heights, widths)
    heights, widths = heights.double(), widths.double()
    low, high = min(aspect_range), max(aspect_range)
    image_aspect = widths / heights
    fallback_h = torch.where(image_aspect < low, torch.round(widths / low), heights)
    fallback_w = torch.where(image_aspect > high, torch.round(heights * high), widths)
    found = taken >= 0
    chosen = taken.clamp(min=0)[:, None]
    crop_h = torch.where(found, tries_h.gather(1, chosen)[:, 0], fallback_h)
    crop_w = torch.where(found, tries_w.gather(1, chosen)[:, 0], fallback_w)
    top = torch.where(found, torch.floor(blocks[:, _POS_Y] * (heights - crop_h + 1)),
                      torch.div(heights - crop_h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(blocks[:, _POS_X] * (widths - crop_w + 1)),
                       torch.div(widths - crop_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, crop_h, crop_w], dim=1).long()


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys cubic convolution kernel with a = -0.5 (PIL's and PyTorch's antialiased bicubic)."""
    x = x.abs()
    a = _CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _dense_rows(index: torch.Tensor, weight: torch.Tensor, in_len: int, device) -> torch.Tensor:
    """Dense float32 ``[n, out, in_len]`` from taps ``index/weight [n, out, K]``, distinct within a row.

    Indices >= ``in_len`` (taps past the crop's border, weight 0) land in scratch columns that are cut
    off; every write goes to its own cell, so the result is independent of write order on any device.
    """
    taps = index.shape[2]
    dense = torch.zeros(index.shape[0], index.shape[1], in_len + taps, dtype=torch.float32, device=device)
    dense.scatter_(2, _upload(index, device), _upload(weight.float(), device))
    return dense[:, :, :in_len]


def _resize_taps(lengths: torch.Tensor, out_len: int, in_len: int,
                 flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The taps of ``resize_weights`` on the host: input index (int64) and float64 weight ``[n, out_len, K]``.

    ``K`` is the widest support among the ``n`` rows; taps past a row's support have weight 0 and the
    distinct indices ``in_len + k`` (scratch columns).
    """
    lengths = lengths.double()
    scale = lengths / out_len
    stretch = scale.clamp(min=1.0)  # the kernel widens when downsampling (antialiasing)
    support = 2.0 * stretch
    centre = scale[:, None] * (torch.arange(out_len, dtype=torch.float64) + 0.5)  # [n, out]
    first = torch.trunc(centre - support[:, None] + 0.5).clamp(min=0)
    last = torch.minimum(torch.trunc(centre + support[:, None] + 0.5), lengths[:, None])
    taps = int((last - first).max().item()) if len(lengths) else 0
    index = first[:, :, None] + torch.arange(taps, dtype=torch.float64)  # [n, out, K]
    weight = _cubic((index - centre[:, :, None] + 0.5) / stretch[:, None, None])
    weight = torch.where(index < last[:, :, None], weight, torch.zeros_like(weight))
    weight = weight / weight.sum(dim=2, keepdim=True)
    # Taps past the crop go to distinct scratch columns in_len + k (their weight is 0).
    index = torch.where(index < last[:, :, None], index, in_len + torch.arange(taps, dtype=torch.float64)).long()
    if flip is not None:
        mirrored = flip.bool()[:, None, None]
        index = torch.where(mirrored, index.flip(1), index)
        weight = torch.where(mirrored, weight.flip(1), weight)
    return index, weight


def resize_weights(lengths: torch.Tensor, out_len: int, in_len: int, device=None,
                   flip: torch.Tensor | None = None) -> torch.Tensor:
    """Antialiased bicubic resampling matrices ``[n, out_len, in_len]`` (float32).

    Sample ``i`` maps its first ``lengths[i]`` input pixels (the rest is padding) onto ``out_len``
    pixels, as PyTorch's ``interpolate(mode='bicubic', antialias=True, align_corners=False)``: support
    2 * scale when downsampling, weights renormalized at the borders. ``flip[i]`` mirrors the output.
    """
    return _dense_rows(*_resize_taps(lengths, out_len, in_len, flip), in_len, device)


@functools.lru_cache(maxsize=16)
def _reflect_taps(length: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """One-hot ``[K, length * length]`` on `device`: tap k of output pixel p reads pixel
    ``reflect(p + k - K // 2)``. Cached per device: every batch blurs the same few view sizes."""
    radius = kernel_size // 2
    if radius >= length:
        raise ValueError(f"a {kernel_size}-tap blur needs views longer than {radius} pixels, got {length}")
    source = torch.arange(length)[:, None] + torch.arange(-radius, radius + 1)  # [length, K]
    source = source.abs()  # reflect at the start: -1 -> 1
    source = torch.where(source > length - 1, 2 * (length - 1) - source, source)  # reflect at the end
    taps = torch.zeros(kernel_size, length, length)
    taps[torch.arange(kernel_size)[None, :], torch.arange(length)[:, None], source] = 1.0
    return _upload(taps.reshape(kernel_size, length * length), device)


def _blur_kernels(sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalized float32 Gaussian kernels ``[n, kernel_size]`` as torchvision's, computed on the host."""
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigmas.double()[:, None]) ** 2)
    return (kernel / kernel.sum(dim=1, keepdim=True)).float()


def _blur_matrices(kernels: torch.Tensor, length: int) -> torch.Tensor:
    """Blur matrices ``[n, length, length]`` on the kernels' device from float32 kernels ``[n, K]``."""
    taps = _reflect_taps(length, kernels.shape[1], kernels.device)
    weights, taps = _exact(kernels, taps)
    return (weights @ taps).float().reshape(len(kernels), length, length)


def blur_weights(sigmas: torch.Tensor, length: int, kernel_size: int, device=None) -> torch.Tensor:
    """Gaussian blur along one axis as matrices ``[n, length, length]`` with reflect borders.

    Kernel as torchvision's ``gaussian_blur``: ``kernel_size`` taps, exp(-t^2 / (2 sigma^2)) normalized.
    Near a border two taps can read the same pixel; their weights are summed by a matmul with a fixed
    one-hot tap pattern, a deterministic order on every device.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _blur_matrices(_upload(_blur_kernels(sigmas, kernel_size), device), length)


def _exact(*operands: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands of a pixel matmul, widened to float64 on CUDA, where a float32 matmul would follow torch's
    process-wide TF32 setting (10 mantissa bits) and float64 never does; a CPU's float32 matmul is exact as it is.
    The render reads no global and changes none: it runs beside the training step, on another thread."""
    return tuple(t.double() for t in operands) if operands[0].device.type == "cuda" else operands


def apply_separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows @ x @ cols^T`` per sample and channel: x ``[n, C, H, W]``, rows ``[n|1, h, H]``, cols ``[n|1, w, W]``."""
    rows, cols = rows[:, None], cols[:, None]
    height, width = x.shape[-2:]
    out_h, out_w = rows.shape[-2], cols.shape[-2]
    x, rows, cols = _exact(x, rows, cols)
    # Contract the axis that shrinks the work most first.
    if out_h * height * width + out_h * width * out_w <= height * width * out_w + out_h * height * out_w:
        return torch.matmul(torch.matmul(rows, x), cols.transpose(-1, -2)).float()
    return torch.matmul(rows, torch.matmul(x, cols.transpose(-1, -2))).float()


def _separable_bmm(x: torch.Tensor, rows: torch.Tensor, cols_t: torch.Tensor) -> torch.Tensor:
    """``apply_separable`` on matrices already laid out per channel: x ``[m, H, W]``, rows ``[m, h, H]``,
    cols_t ``[m, W, w]`` (all contiguous). The same two matmuls (shapes, order, inputs) as ``apply_separable``
    runs after broadcasting and copying its arguments, without those copies."""
    height, width = x.shape[-2:]
    out_h, out_w = rows.shape[-2], cols_t.shape[-1]
    x, rows, cols_t = _exact(x, rows, cols_t)
    if out_h * height * width + out_h * width * out_w <= height * width * out_w + out_h * height * out_w:
        return torch.bmm(torch.bmm(rows, x), cols_t).float()
    return torch.bmm(rows, torch.bmm(x, cols_t)).float()


# ----------------------------------------------------------------------------------- colour ops

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[n, 1, H, W]`` with torchvision's weights and operation order."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _upload(values.to(x.dtype), x.device).reshape(-1, *([1] * (x.ndim - 1)))


def _blend(image: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (image * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, _per_sample(factor, x))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), _per_sample(factor, x))


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(dim=-3)
    low, value = torch.aminmax(x, dim=-3)
    grey = value == low  # hue and saturation undefined: set to 0 without dividing by 0
    spread = value - low
    saturation = spread / torch.where(grey, 1.0, value)
    divisor = torch.where(grey, 1.0, spread)
    rc, gc, bc = ((value.unsqueeze(-3) - x) / divisor.unsqueeze(-3)).unbind(dim=-3)  # 2 operators, not 6
    # The sector of the largest channel (red first, then green), selected rather than summed as
    # torchvision does (sector * mask, added up): the same value but for the sign of a zero hue, which
    # the fmod below maps to +0 either way, in fewer operators.
    hue = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.fmod(hue * (1.0 / 6.0) + 1.0, 1.0)
    return hue, saturation, value


@functools.lru_cache(maxsize=8)
def _hsv_sector_table(device: torch.device) -> torch.Tensor:
    """Which of (v, p, q, t) is R, G and B in each of the six hue sectors; uploaded once per device."""
    return _upload(torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]]), device)


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    sector6 = hue * 6.0
    sector = torch.floor(sector6)
    frac = sector6 - sector
    sector = sector.long().remainder(6)
    one_minus_s = 1.0 - saturation
    p = (one_minus_s * value).clamp(0.0, 1.0)
    q = ((1.0 - saturation * frac) * value).clamp(0.0, 1.0)
    t = ((saturation * frac + one_minus_s) * value).clamp(0.0, 1.0)
    candidates = torch.stack([value, p, q, t], dim=-3)  # [n, 4, H, W]
    return candidates.gather(-3, _hsv_sector_table(hue.device)[:, sector].movedim(0, -3))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = _rgb_to_hsv(x)
    hue = (hue + _per_sample(shift, hue)).remainder(1.0)
    return _hsv_to_rgb(hue, saturation, value)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


@functools.lru_cache(maxsize=16)
def _channel_constants(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-channel constants ``[C, 1, 1]``, uploaded once per device (not once per call)."""
    return _upload(torch.tensor(values, dtype=dtype), device)[:, None, None]


def normalize(x: torch.Tensor, cfg: ViewConfig = ViewConfig()) -> torch.Tensor:
    return (x - _channel_constants(cfg.mean, x.dtype, x.device)) / _channel_constants(cfg.std, x.dtype, x.device)


def denormalize(x: torch.Tensor, cfg: ViewConfig = ViewConfig()) -> torch.Tensor:
    """Inverse of ``normalize`` (for pictures), clamped to [0, 1]."""
    mean, std = _channel_constants(cfg.mean, x.dtype, x.device), _channel_constants(cfg.std, x.dtype, x.device)
    return (x * std + mean).clamp(0.0, 1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _grayscale_rgb(x: torch.Tensor) -> torch.Tensor:
    return grayscale(x).expand_as(x).contiguous()


def _blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur of ``x [n, C, H, W]`` with float32 kernels ``[n, K]`` on x's device."""
    height, width = x.shape[-2:]
    return apply_separable(x, _blur_matrices(kernels, height), _blur_matrices(kernels, width))


def blur_kernel_size(cfg: ViewConfig) -> int:
    """Odd kernel covering +-3 sigma of the largest sigma (13 taps for sigma <= 2)."""
    return 2 * math.ceil(3 * cfg.blur_sigma[1]) + 1


# ------------------------------------------------------------------------------------- render plans
#
# A render call is split in two: ``plan_*`` decides everything on the host from the records and the
# images' sizes (crop boxes, the crop gather, resize and blur weights, which colour op runs on which
# samples) and stages it as tensors in one byte buffer (pinned when the target is CUDA); ``execute_*``
# runs the device work from that plan with a fixed sequence of operators and no host round trip. A
# prefetcher can therefore plan (and upload) batch N+1 on another thread while step N computes.

class PackedImages(NamedTuple):
    """Variable-size RGB images in one buffer, the source every crop of a render call is gathered from.

    ``pixels`` is uint8 ``[P, 3]``: the rows of image ``i`` start at pixel ``offsets[i]``, one image
    after another, followed by zero pixels as wide as the widest image, so that a window of any crop
    width starting in any row stays inside. ``offsets``, ``heights``, ``widths`` are int64 host tensors:
    planning reads them, the device never does.
    """
    pixels: torch.Tensor
    offsets: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "PackedImages":
        return self._replace(pixels=self.pixels.to(device, non_blocking=non_blocking))

    def select(self, start: int, stop: int) -> "PackedImages":
        """Images ``start..stop-1`` (the same pixel buffer)."""
        return self._replace(offsets=self.offsets[start:stop], heights=self.heights[start:stop],
                             widths=self.widths[start:stop])


def pack_images(images: Sequence, what: str = "images", pin_memory: bool = False) -> PackedImages:
    """Pack decoded images (any mix of grey / RGB / RGBA uint8, see ``to_rgb_uint8``) into one buffer.

    The buffer is built where the images are (one concatenation); ``pin_memory`` pins it when they are on
    the host, for a non-blocking copy to the device with ``PackedImages.to``.
    """
    images = _as_images(images, what)
    heights = torch.tensor([image.shape[0] for image in images], dtype=torch.int64)
    widths = torch.tensor([image.shape[1] for image in images], dtype=torch.int64)
    sizes = heights * widths
    total, pad = int(sizes.sum()), int(widths.max())
    source = images[0].device
    pixels = torch.empty(total + pad, 3, dtype=torch.uint8, device=source,
                         pin_memory=pin_memory and source.type == "cpu")
    torch.cat([image.reshape(-1, 3) for image in images], out=pixels[:total])
    pixels[total:] = 0
    return PackedImages(pixels, torch.cumsum(sizes, 0) - sizes, heights, widths)


class StagedTensors:
    """Host tensors of several dtypes laid out in one byte buffer: a whole plan moves in one copy."""

    _ALIGN = 16  # bytes; every dtype staged here can be viewed at such an offset

    def __init__(self, buffer: torch.Tensor, layout: tuple[tuple[int, torch.dtype, tuple[int, ...]], ...]):
        self.buffer, self.layout = buffer, layout

    @classmethod
    def stage(cls, tensors: Sequence[torch.Tensor], pin_memory: bool) -> "StagedTensors":
        layout, offset = [], 0
        for tensor in tensors:
            layout.append((offset, tensor.dtype, tuple(tensor.shape)))
            offset += -(-tensor.numel() * tensor.element_size() // cls._ALIGN) * cls._ALIGN
        staged = cls(torch.empty(offset, dtype=torch.uint8, pin_memory=pin_memory), tuple(layout))
        for key, tensor in enumerate(tensors):
            staged[key].copy_(tensor)
        return staged

    def __getitem__(self, key: int) -> torch.Tensor:
        offset, dtype, shape = self.layout[key]
        nbytes = math.prod(shape) * dtype.itemsize
        return self.buffer[offset:offset + nbytes].view(dtype).view(shape)

    def to(self, device, non_blocking: bool = False) -> "StagedTensors":
        return StagedTensors(self.buffer.to(device, non_blocking=non_blocking), self.layout)


class _PlanTensors:
    """Collects the tensors of a plan; each ``add`` returns the key it is staged under."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> int:
        self.tensors.append(tensor.contiguous())
        return len(self.tensors) - 1


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


def _plan_colour(tensors: _PlanTensors, blocks: torch.Tensor, cfg: ViewConfig) -> tuple[_ColourStep, ...]:
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

    jitter = blocks[:, _JITTER] > 0.5
    factors = blocks[:, _FACTORS].float()
    order = blocks[:, _ORDER].long()
    for step in range(4):
        for op_id, op in enumerate(_JITTER_OPS):
            add(op.__name__, jitter & (order[:, step] == op_id), factors[:, op_id])
    add("grayscale", blocks[:, _GRAY] > 0.5)
    sigma = blocks[:, _BLUR_SIGMA]
    add("blur", sigma > 0, sigma, prepare=lambda sigmas: _blur_kernels(sigmas, blur_kernel_size(cfg)))
    add("solarize", blocks[:, _SOLARIZE] > 0.5)
    return tuple(steps)


def _plan_crops(tensors: _PlanTensors, sources: PackedImages, source_index: torch.Tensor, blocks: torch.Tensor,
                out_size: tuple[int, int], aspect_range: tuple[float, float], cfg: ViewConfig) -> _CropPlan:
    """Plan crops ``[n, 3, *out_size]``: crop ``i`` cuts ``blocks[i]`` (aspects drawn from ``aspect_range``) from
    source ``source_index[i]``."""
    heights, widths = sources.heights[source_index], sources.widths[source_index]
    boxes = crop_boxes(blocks, heights, widths, aspect_range)
    tops, lefts, crop_h, crop_w = boxes.unbind(1)
    row_starts = sources.offsets[source_index] + tops * widths + lefts  # first pixel of each crop
    flips = blocks[:, _FLIP] > 0.5
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
                (row_weights, _resize_taps(crop_h[group], out_h, height), False),
                (col_weights, _resize_taps(crop_w[group], out_w, width, flip=flips[group]), True)):
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


_PLANNED_OPS = {op.__name__: op for op in _JITTER_OPS} | {"grayscale": _grayscale_rgb, "blur": _blur}


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
        resized.append(_separable_bmm(x, rows, cols_t))
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
    records = params.double()
    tensors = _PlanTensors()
    every = torch.arange(n)
    crops = (_plan_crops(tensors, images, every, records[:, _GLOBAL_BLOCK], cfg.global_size, cfg.person_aspect, cfg),
             _plan_crops(tensors, images, every, records[:, _PERSON_BLOCK], cfg.local_size, cfg.person_aspect, cfg),
             _plan_crops(tensors, backgrounds, every, records[:, _BACKGROUND_BLOCK], cfg.crowd_size,
                         cfg.background_aspect, cfg))
    paste = tensors.add(records[:, _PASTE].long())
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
    tensors = _PlanTensors()
    crops = _plan_crops(tensors, images, torch.arange(n).repeat_interleave(num_local),
                        params.reshape(n * num_local, -1)[:, 1:].double(), cfg.local_size, cfg.person_aspect, cfg)
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

def _packed_on(images: list[torch.Tensor], device) -> tuple[PackedImages, torch.device]:
    """The images packed and moved to the render device (default: theirs), and that device."""
    device = torch.device(device) if device is not None else images[0].device
    on_cuda = device.type == "cuda"  # a non-blocking copy to the host could be read before it lands
    return pack_images(images, pin_memory=on_cuda).to(device, non_blocking=on_cuda), device


def render_crops(images: Sequence[torch.Tensor], blocks: torch.Tensor, out_size: tuple[int, int],
                 aspect_range: tuple[float, float], cfg: ViewConfig, device: torch.device) -> torch.Tensor:
    """Crops ``[n, 3, h, w]`` in [0, 1] (not normalized) of RGB uint8 images, one crop block each (aspects
    drawn from ``aspect_range``)."""
    packed, device = _packed_on(_as_images(images, "images"), device)
    tensors = _PlanTensors()
    crops = _plan_crops(tensors, packed, torch.arange(len(blocks)), blocks.double(), out_size, aspect_range, cfg)
    staged = StagedTensors.stage(tensors.tensors, device.type == "cuda").to(device, non_blocking=True)
    return _execute_crops(packed.pixels, crops, staged)


def paste_persons(canvas: torch.Tensor, persons: Sequence[torch.Tensor], positions: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """Blend ``alpha * person + (1 - alpha) * canvas`` at per-sample (y, x) positions ``[n, 2 * len(persons)]``."""
    canvas = canvas.clone()
    batch = torch.arange(len(canvas), device=canvas.device)[:, None, None]
    positions = _upload(positions.long(), canvas.device)
    for k, person in enumerate(persons):
        rows = positions[:, 2 * k, None] + torch.arange(person.shape[-2], device=canvas.device)  # [n, h]
        cols = positions[:, 2 * k + 1, None] + torch.arange(person.shape[-1], device=canvas.device)  # [n, w]
        where = (batch, slice(None), rows[:, :, None], cols[:, None, :])  # picks [n, h, w, C]
        region = canvas[where]
        canvas[where] = person.permute(0, 2, 3, 1) * alpha + region * (1.0 - alpha)
    return canvas


def _as_images(images: Sequence, what: str) -> list[torch.Tensor]:
    converted = []
    for i, image in enumerate(images):
        try:
            converted.append(to_rgb_uint8(image))
        except ValueError as error:
            raise ValueError(f"{what}[{i}]: {error}") from None
    return converted


def render_view_sets(images: Sequence, backgrounds: Sequence, params, cfg: ViewConfig = ViewConfig(),
                     device=None) -> RenderedViews:
    """Render view sets: the normalized global views ``[n, 3, 256, 128]`` and crowd views ``[n, 3, 256, 256]``.

    ``images[i]`` is the person image of view set ``i``; ``backgrounds[i]`` is
    ``pool[background_indices(params)[i]]``. Images are uint8 ``[H, W, C]`` (any size; grey/RGBA are
    converted). ``device`` defaults to the images' device. Pure: no randomness, no state. The same as
    ``plan_view_sets`` then ``execute_view_sets`` on the images packed by ``pack_images``.
    """
    params = check_view_params(params)
    if params.ndim != 2:
        raise ViewParamsError(f"view set parameters must be [n, {VIEW_SET_FIELDS}], got {tuple(params.shape)}")
    n = len(params)
    if len(backgrounds) == 0 and n > 0:
        raise ValueError("the background pool is empty: render_view_sets needs backgrounds[i] for every view set")
    if len(images) != n or len(backgrounds) != n:
        raise ValueError(f"{n} view set records need {n} images and {n} backgrounds, got {len(images)} images "
                         f"and {len(backgrounds)} backgrounds")
    if n == 0:
        dev = torch.device(device or "cpu")
        return RenderedViews(torch.zeros(0, 3, *cfg.global_size, device=dev),
                             torch.zeros(0, 3, *cfg.crowd_size, device=dev))
    images, backgrounds = _as_images(images, "images"), _as_images(backgrounds, "backgrounds")
    packed, device = _packed_on(images + backgrounds, device)
    plan = plan_view_sets(packed.select(0, n), packed.select(n, 2 * n), params, cfg, device.type == "cuda")
    return execute_view_sets(packed.pixels, plan.to(device, non_blocking=True))


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
    packed, device = _packed_on(_as_images(images, "images"), device)
    plan = plan_local_crops(packed, params, cfg, device.type == "cuda")
    return execute_local_crops(packed.pixels, plan.to(device, non_blocking=True))
