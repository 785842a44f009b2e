"""Crop boxes and resampling: where each crop is cut, and the matrices that resize and blur it.

Crop boxes (``crop_boxes``) follow torchvision's ``RandomResizedCrop.get_params`` exactly, resolved on each
source image's own size H x W when rendering (the sampler never sees the image): try k gives
w = round(sqrt(H*W*scale_k*aspect_k)), h = round(sqrt(H*W*scale_k/aspect_k)) in float64 from the stored
float32 values, and the first try with 0 < w <= W and 0 < h <= H is the box, placed at
``floor(pos * (free range + 1))``, every integer position equally likely. If no try fits, the box is
torchvision's centre crop with the image's aspect clamped to the crop kind's aspect range, taken from the
``ViewConfig`` as float64 (as torchvision takes the range it was given). A box is never shrunk to fit.
The same record and image size give the same integer box on any machine (IEEE float64 arithmetic on the
host), so a render on the GPU cuts exactly the box the cache stage cut.

Resizing and blurring are separable linear maps: per-sample matrices (weights in float64, PIL/PyTorch
antialiased bicubic with a = -0.5; blur kernels as torchvision's) applied as batched matmuls.
"""
from __future__ import annotations

import functools

import torch

from dpal.views.records import CropFields
from dpal.views.staging import upload

# PIL / PyTorch antialiased bicubic uses a = -0.5 (the non-antialiased path uses -0.75).
_CUBIC_A = -0.5


def crop_tries(blocks: torch.Tensor, heights: torch.Tensor,
               widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's tries on sources of the given sizes: the try taken (int64 ``[n]``, the first that
    fits, -1 = none fits: the centre-crop fallback) and every try's height and width (float64 ``[n, tries]``).

    As torchvision: target area = H * W * scale, w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect))
    (float64, round half to even like Python's ``round``), fitting when 0 < w <= W and 0 < h <= H.
    """
    fields = CropFields.of(blocks.double())
    heights, widths = heights.double()[:, None], widths.double()[:, None]
    area = heights * widths * fields.scales
    aspect = fields.aspects
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
    fields = CropFields.of(blocks.double())
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
    top = torch.where(found, torch.floor(fields.pos_y * (heights - crop_h + 1)),
                      torch.div(heights - crop_h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(fields.pos_x * (widths - crop_w + 1)),
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
    dense.scatter_(2, upload(index, device), upload(weight.float(), device))
    return dense[:, :, :in_len]


def resize_taps(lengths: torch.Tensor, out_len: int, in_len: int,
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
    return _dense_rows(*resize_taps(lengths, out_len, in_len, flip), in_len, device)


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
    return upload(taps.reshape(kernel_size, length * length), device)


def blur_kernels(sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalized float32 Gaussian kernels ``[n, kernel_size]`` as torchvision's, computed on the host."""
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigmas.double()[:, None]) ** 2)
    return (kernel / kernel.sum(dim=1, keepdim=True)).float()


def blur_matrices(kernels: torch.Tensor, length: int) -> torch.Tensor:
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
    return blur_matrices(upload(blur_kernels(sigmas, kernel_size), device), length)


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


def separable_bmm(x: torch.Tensor, rows: torch.Tensor, cols_t: torch.Tensor) -> torch.Tensor:
    """``apply_separable`` on matrices already laid out per channel: x ``[m, H, W]``, rows ``[m, h, H]``,
    cols_t ``[m, W, w]`` (all contiguous). The same two matmuls (shapes, order, inputs) as ``apply_separable``
    runs after broadcasting and copying its arguments, without those copies."""
    height, width = x.shape[-2:]
    out_h, out_w = rows.shape[-2], cols_t.shape[-1]
    x, rows, cols_t = _exact(x, rows, cols_t)
    if out_h * height * width + out_h * width * out_w <= height * width * out_w + out_h * height * out_w:
        return torch.bmm(torch.bmm(rows, x), cols_t).float()
    return torch.bmm(rows, torch.bmm(x, cols_t)).float()

