"""Fixed-size bicubic resizes of token grids as two matrix products (deterministic in backward).

`F.interpolate(..., mode="bicubic")` has no deterministic CUDA backward (its backward scatters with
atomics), so `torch.use_deterministic_algorithms(True)` refuses it at the first backward. The resizes the
students need are fixed per (input size, output size): the ViT position grid (antialiased, as timm's
`resample_abs_pos_embed`) and the Swin tokens' 2x upsample (plain bicubic). Bicubic resampling is
separable, out = A_h X A_w^T, so each is two GEMMs with matrices made once per size pair by resizing an
identity with the very same `F.interpolate` call (in float64): the result equals F.interpolate's up to
float rounding, and the GEMMs' backward is deterministic.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def _axis_matrix_cpu(in_size: int, out_size: int, antialias: bool) -> torch.Tensor:
    """[out_size, in_size] float64: row o holds the weights F.interpolate gives output o along one axis."""
    # Image k of the batch is e_k along the height, repeated over a width of 2 that stays 2 (scale 1 is the
    # identity there), so image k resized is column k. (Width 2, not 1: PyTorch's antialiased path
    # averages everything when a dimension has size 1.)
    identity = torch.eye(in_size, dtype=torch.float64, device="cpu").view(in_size, 1, in_size, 1).expand(-1, -1, -1, 2)
    resized = F.interpolate(identity, size=(out_size, 2), mode="bicubic", align_corners=False, antialias=antialias)
    return resized[:, 0, :, 0].t().contiguous()


@functools.lru_cache(maxsize=64)
def _axis_matrix(in_size: int, out_size: int, antialias: bool, device: torch.device) -> torch.Tensor:
    return _axis_matrix_cpu(in_size, out_size, antialias).to(device, torch.float32)


@torch.library.custom_op("dpal::bicubic_axis_matrix", mutates_args=())
def bicubic_axis_matrix(in_size: int, out_size: int, antialias: bool, device: torch.device) -> torch.Tensor:
    """The float32 [out_size, in_size] matrix of one axis, a copy of the cached one. A custom op so that
    torch.compile (`--compile`) keeps it whole, without a graph break: traced, dynamo would bypass the cache
    and rebuild the matrix on the CPU in every call. (A copy: an op's output must not be shared with later
    calls.)"""
    return _axis_matrix(in_size, out_size, antialias, device).clone()


@bicubic_axis_matrix.register_fake
def _(in_size, out_size, antialias, device):
    return torch.empty(out_size, in_size, device=device, dtype=torch.float32)


def bicubic_resize(grid: torch.Tensor, size: tuple[int, int], *, antialias: bool) -> torch.Tensor:
    """F.interpolate(mode="bicubic", align_corners=False, antialias=antialias) of a channels-last grid.

    grid [B, H, W, C] -> [B, size[0], size[1], C], computed in float32 (as timm and F.interpolate do,
    whatever autocast says) and returned in grid's dtype.
    """
    height, width = grid.shape[1:3]
    rows = bicubic_axis_matrix(height, size[0], antialias, grid.device)
    cols = bicubic_axis_matrix(width, size[1], antialias, grid.device)
    # Autocast would round the GEMMs' operands to bf16; it exists on CUDA and CPU only (not on meta).
    no_autocast = torch.autocast(grid.device.type, enabled=False) if grid.device.type in ("cuda", "cpu") \
        else contextlib.nullcontext()
    with no_autocast:
        out = torch.einsum("oh,bhwc->bowc", rows, grid.float())
        out = torch.einsum("pw,bowc->bopc", cols, out)
    return out.to(grid.dtype)
