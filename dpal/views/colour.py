"""Colour ops on batches with per-sample factors, as torchvision's float-tensor functions: brightness,
contrast, saturation and hue jitter, grayscale, Gaussian blur, solarize, and the ImageNet normalization.

Every op takes float32 ``[n, C, H, W]`` in [0, 1] and clamps to [0, 1], as torchvision's float path does.
"""
from __future__ import annotations

import functools
import math

import torch

from dpal.config import ViewConfig
from dpal.views.crops import blur_matrices, apply_separable
from dpal.views.staging import upload


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[n, 1, H, W]`` with torchvision's weights and operation order."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return upload(values.to(x.dtype), x.device).reshape(-1, *([1] * (x.ndim - 1)))


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
    return upload(torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]]), device)


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
    return upload(torch.tensor(values, dtype=dtype), device)[:, None, None]


def normalize(x: torch.Tensor, cfg: ViewConfig = ViewConfig()) -> torch.Tensor:
    return (x - _channel_constants(cfg.mean, x.dtype, x.device)) / _channel_constants(cfg.std, x.dtype, x.device)


def denormalize(x: torch.Tensor, cfg: ViewConfig = ViewConfig()) -> torch.Tensor:
    """Inverse of ``normalize`` (for pictures), clamped to [0, 1]."""
    mean, std = _channel_constants(cfg.mean, x.dtype, x.device), _channel_constants(cfg.std, x.dtype, x.device)
    return (x * std + mean).clamp(0.0, 1.0)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def grayscale_rgb(x: torch.Tensor) -> torch.Tensor:
    return grayscale(x).expand_as(x).contiguous()


def blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur of ``x [n, C, H, W]`` with float32 kernels ``[n, K]`` on x's device."""
    height, width = x.shape[-2:]
    return apply_separable(x, blur_matrices(kernels, height), blur_matrices(kernels, width))


def blur_kernel_size(cfg: ViewConfig) -> int:
    """Odd kernel covering +-3 sigma of the largest sigma (13 taps for sigma <= 2)."""
    return 2 * math.ceil(3 * cfg.blur_sigma[1]) + 1

