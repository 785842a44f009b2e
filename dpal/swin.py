"""Swin window attention on feature grids that are not window multiples (every grid of a 256x128 view).

Shared by the SOLIDER teacher (`dpal.teachers`) and the Swin students (`dpal.students`): both pad the map to
window multiples before the cyclic shift (mmdet's order; timm shifts first), and differ only in which shift
they use and whether padded positions are masked out; subclasses say which.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse

SWIN_WINDOW = 7


class PaddedWindowBlock(SwinTransformerBlock):
    """timm's Swin block (same parameters and names) whose window attention pads, then shifts."""

    def _shift_and_mask_grid(self, height: int, width: int, padded_h: int, padded_w: int):
        """(shift, (h, w)) for a map of height x width padded to padded_h x padded_w: the cyclic shift, and
        the grid `window_mask` treats as real (positions beyond it get their own label)."""
        raise NotImplementedError

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
        padded_h, padded_w = x.shape[1], x.shape[2]
        shift, mask_grid = self._shift_and_mask_grid(height, width, padded_h, padded_w)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        # Eager: one cached mask per grid and device. Compiled: traced as constants (dynamo bypasses lru_cache).
        build_mask = window_mask.__wrapped__ if torch.compiler.is_compiling() else window_mask
        mask = build_mask(*mask_grid, (win_h, win_w), shift, x.device)
        if mask is not None:
            mask = mask.to(x.dtype)
        windows = window_partition(x, (win_h, win_w)).view(-1, win_h * win_w, channels)
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, channels)
        x = window_reverse(windows, (win_h, win_w), padded_h, padded_w)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :height, :width].contiguous()


@functools.lru_cache(maxsize=64)
def window_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int],
                 device: torch.device) -> torch.Tensor | None:
    """Additive mask [num_windows, area, area] (0 / -100 as Swin) for a padded, shifted map; None if not needed.

    Labels are built on the padded map in shifted coordinates: Swin's three regions per shifted axis, and
    one extra label for padded positions. Tokens attend only to tokens with the same label.
    """
    win_h, win_w = window
    padded_h, padded_w = height + (-height) % win_h, width + (-width) % win_w
    if padded_h == height and padded_w == width and not any(shift):
        return None

    def axis_regions(size: int, win: int, s: int) -> torch.Tensor:
        regions = torch.zeros(size, dtype=torch.long, device=device)
        if s:
            regions[size - win:size - s] = 1
            regions[size - s:] = 2
        return regions

    labels = axis_regions(padded_h, win_h, shift[0])[:, None] * 3 + axis_regions(padded_w, win_w, shift[1])[None, :]
    padded = torch.ones(padded_h, padded_w, dtype=torch.bool, device=device)
    padded[:height, :width] = False
    padded = torch.roll(padded, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    labels = labels.masked_fill(padded, -1)
    labels = window_partition(labels[None, :, :, None], window).reshape(-1, win_h * win_w)
    same = labels[:, :, None] == labels[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill_(~same, -100.0)
