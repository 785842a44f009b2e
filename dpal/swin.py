"""Swin window attention on feature grids that are not window multiples (every grid of a 256x128 view).

Shared by the SOLIDER teacher (`dpal.teachers`) and the Swin students (`dpal.students`): both pad the map to
window multiples before the cyclic shift (mmdet's order; timm shifts first), and differ only in which shift
they use and whether padded positions are masked out; subclasses say which.

timm's Swin has no extension point for its blocks' window attention (its `_attn` is private and the stages
build `SwinTransformerBlock` by name), so the model is built by timm and `use_padded_windows` then rebuilds
each block as a `PaddedWindowBlock` around that block's own layers: parameters, init and state-dict names stay
timm's, and the window attention is this module's.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from torch import nn

SWIN_WINDOW = 7


class PaddedWindowBlock(nn.Module):
    """A timm Swin block's layers (same parameters and names) around a window attention that pads, then shifts."""

    def __init__(self, block: SwinTransformerBlock):
        super().__init__()
        # In timm's order, so the state dict lists the same names in the same order.
        self.norm1, self.attn, self.drop_path1 = block.norm1, block.attn, block.drop_path1
        self.norm2, self.mlp, self.drop_path2 = block.norm2, block.mlp, block.drop_path2
        self.window_size, self.shift_size = tuple(block.window_size), tuple(block.shift_size)

    def _shift_and_mask_grid(self, height: int, width: int, padded_h: int, padded_w: int):
        """(shift, (h, w)) for a map of height x width padded to padded_h x padded_w: the cyclic shift, and
        the grid `window_mask` treats as real (positions beyond it get their own label)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, W, C]: timm's pre-norm residual block, with this window attention."""
        batch, height, width, channels = x.shape
        x = x + self.drop_path1(self.window_attention(self.norm1(x)))
        x = x.reshape(batch, -1, channels)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(batch, height, width, channels)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
        padded_h, padded_w = x.shape[1], x.shape[2]
        shift, mask_grid = self._shift_and_mask_grid(height, width, padded_h, padded_w)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        # Eager: one cached mask per grid and device. Compiled: traced as constants (dynamo bypasses lru_cache).
        # Fake (shape-only) tensors: built each time, never cached, so a real call never gets a fake mask.
        uncached = torch.compiler.is_compiling() or is_fake(x)
        build_mask = window_mask.__wrapped__ if uncached else window_mask
        mask = build_mask(*mask_grid, (win_h, win_w), shift, x.device)
        if mask is not None:
            mask = mask.to(x.dtype)
        windows = window_partition(x, (win_h, win_w)).view(-1, win_h * win_w, channels)
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, channels)
        x = window_reverse(windows, (win_h, win_w), padded_h, padded_w)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :height, :width].contiguous()


def use_padded_windows(model: SwinTransformer, block_type: type[PaddedWindowBlock]) -> SwinTransformer:
    """`model` (built by timm) with every block rebuilt as `block_type` around its own layers; returns it."""
    for stage in model.layers:
        stage.blocks = nn.Sequential(*(block_type(block) for block in stage.blocks))
    return model


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
