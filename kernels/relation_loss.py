"""Fused relation loss: matches `dpal.losses.relation_kl_reference` without storing student logits.

With S = Y Y^T / sqrt(D) per sample, p the target rows (int8 targets are log-domain codes, decoded in
the kernel as p = exp(q * row scale - lse_t) with lse_t = logsumexp_j q_ij * scale_i from a pre-pass
over the int8 row), P_i = sum_j p_ij and lse_i = logsumexp_j S_ij:

    KL_i = sum_j xlogy(p_ij, p_ij) - sum_j p_ij S_ij + P_i lse_i        loss = mean_{b,i} KL_i

Forward: one program per (sample, block of rows) sweeps the column blocks with an online logsumexp
(flash-attention style); S tiles live only in registers. It writes cross_i = sum_j xlogy(p, p) - p S per
row (the loss is sum_i cross_i + P_i lse_i, formed outside) and keeps lse, P and lse_t [B, N] for backward.
Backward: dKL/dS_ij = P_i softmax_ij - p_ij =: G_ij, and since S is symmetric,
dY = (G + G^T) Y / sqrt(D) (times the incoming gradient / (B N)). One program per (sample, I, J) tile
recomputes S_IJ and writes (G_IJ + G_JI^T) scaled — G_JI^T comes from the same S tile with the column
rows' lse and the transposed target tile — and a batched cuBLAS GEMM multiplies it by Y. The only
N x N buffer is that gradient, in Y's dtype, the size of the target itself, alive during backward only.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._common import (INTERPRETED, KernelConfig, check_device, check_dtype, check_shape, dot_operands,
                             dot_precision, launch, mma)

OP = "fused relation KL"

# Tiles (rows I x columns J, K step over D), pinned per (kernel, N, D, dot operands) from the sm_90 compile
# facts (`make check-sm90`; README "Kernel configurations"): 64 x 64 tiles with 8 warps are the only ones
# that neither spill nor lose wgmma for every target dtype (larger tiles and 4 warps reach 255 registers and
# spill with fp32 or int8 targets). fp32 operands without TF32 (IEEE dots on FMA units) take K steps of 16.
# Shapes off the table take the default of their operand kind; the choice never depends on timing.
_TENSOR_CORE_TILES = KernelConfig.of(8, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_K=64)
_FMA_TILES = KernelConfig.of(8, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_K=16)
DEFAULT_CONFIGS = {"bf16": _TENSOR_CORE_TILES, "fp16": _TENSOR_CORE_TILES, "tf32": _TENSOR_CORE_TILES,
                   "fp32": _FMA_TILES}
# The recipes' shapes: N = 257 (ViT teachers: CLS + 16x16 crowd grid) or 64 (SOLIDER: 8x8), D = 768 or 1024.
# One exception to the kind's default: at N = 64 (N a multiple of 16, so the compiler specialises it) the
# IEEE forward with K steps of 16 is held to 128 registers and spills with fp16/bf16 targets; K steps of 32
# do not (112-146 registers).
PINNED_CONFIGS = {(kernel, n, dim, kind): DEFAULT_CONFIGS[kind] for kernel in ("fwd", "bwd")
                  for n, dim in ((257, 768), (257, 1024), (64, 1024)) for kind in DEFAULT_CONFIGS}
PINNED_CONFIGS[("fwd", 64, 1024, "fp32")] = KernelConfig.of(8, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_K=32)
TARGET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)


@triton.jit
def _scaled_logits(y_ptr, offs_i, offs_j, N, D, scale, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """S tile = Y_I Y_J^T * scale for one sample (y_ptr at the sample), fp32."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(y_ptr + offs_i[:, None] * D + offs_k[None, :], mask=(offs_i[:, None] < N) & k_ok[None, :],
                    other=0.0)
        b = tl.load(y_ptr + offs_j[None, :] * D + offs_k[:, None], mask=(offs_j[None, :] < N) & k_ok[:, None],
                    other=0.0)
        acc = mma(a, b, acc, DOT_PRECISION, UPCAST_DOT)
    return acc * scale


@triton.jit
def _target_log_normalizer(t_ptr, row_scale_ptr, rows, N, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """lse_t = logsumexp_j q_ij * scale_i of int8 log-domain target rows (0 for rows past N)."""
    row_ok = rows < N
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    running_max = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        codes = tl.load(t_ptr + rows[:, None] * N + cols[None, :], mask=row_ok[:, None] & (cols < N)[None, :],
                        other=0).to(tl.float32)
        logits = tl.where((cols < N)[None, :], codes * row_scale[:, None], float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    return running_max + tl.log(running_sum)


@triton.jit
def _target_tile(t_ptr, row_scale_ptr, target_lse, rows, cols, N, QUANTIZED: tl.constexpr):
    """Target probabilities p[rows, cols] of one sample as fp32 (0 outside); int8 codes decode as
    exp(q * scale - lse_t) with target_lse = lse_t of `rows`."""
    ok = (rows[:, None] < N) & (cols[None, :] < N)
    p = tl.load(t_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0).to(tl.float32)
    if QUANTIZED:
        row_scale = tl.load(row_scale_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp(p * row_scale[:, None] - target_lse[:, None]), 0.0)
    return p


@triton.jit
def _relation_kl_fwd_kernel(y_ptr, t_ptr, row_scale_ptr, cross_ptr, lse_ptr, mass_ptr, target_lse_ptr, N, D, scale,
                            QUANTIZED: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Per row: cross = sum_j p log p - p S, lse, P and lse_t; KL_i = cross_i + P_i lse_i is formed by the
    caller. (Each row sum leaves the loop into exactly one store: Triton's thread-locality pass on sm_90
    asserts when a reduction carried through a loop has two uses after it.)"""
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    y_ptr += b * N * D
    t_ptr += b * N * N
    row_scale_ptr += b * N
    target_lse = tl.zeros((BLOCK_I,), dtype=tl.float32)
    if QUANTIZED:
        target_lse = _target_log_normalizer(t_ptr, row_scale_ptr, offs_i, N, BLOCK_I, BLOCK_J)
    running_max = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_I,), dtype=tl.float32)
    mass = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        col_ok = (offs_j < N)[None, :]
        s = _scaled_logits(y_ptr, offs_i, offs_j, N, D, scale, BLOCK_I, BLOCK_J, BLOCK_K, DOT_PRECISION,
                           UPCAST_DOT)
        new_max = tl.maximum(running_max, tl.max(tl.where(col_ok, s, float("-inf")), axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + \
            tl.sum(tl.where(col_ok, tl.exp(s - new_max[:, None]), 0.0), axis=1)
        running_max = new_max
        p = _target_tile(t_ptr, row_scale_ptr, target_lse, offs_i, offs_j, N, QUANTIZED)
        # p = 0 on padded columns (where s is finite) and wherever the target is exactly 0 (x log x -> 0).
        cross += tl.sum(tl.where(p > 0, p * (tl.log(tl.where(p > 0, p, 1.0)) - s), 0.0), axis=1)
        mass += tl.sum(p, axis=1)
    row_ok = offs_i < N
    tl.store(cross_ptr + b * N + offs_i, cross, mask=row_ok)
    tl.store(lse_ptr + b * N + offs_i, running_max + tl.log(running_sum), mask=row_ok)
    tl.store(mass_ptr + b * N + offs_i, mass, mask=row_ok)
    tl.store(target_lse_ptr + b * N + offs_i, target_lse, mask=row_ok)


@triton.jit
def _relation_kl_bwd_kernel(y_ptr, t_ptr, row_scale_ptr, lse_ptr, mass_ptr, target_lse_ptr, grad_ptr, out_ptr, N,
                            D, scale,
                            QUANTIZED: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """out[b, I, J] = d loss / d S_IJ + (d loss / d S_JI)^T, already multiplied by the scale of S."""
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    y_ptr += b * N * D
    t_ptr += b * N * N
    row_scale_ptr += b * N
    s = _scaled_logits(y_ptr, offs_i, offs_j, N, D, scale, BLOCK_I, BLOCK_J, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    row_ok = offs_i < N
    col_ok = offs_j < N
    lse_i = tl.load(lse_ptr + b * N + offs_i, mask=row_ok, other=0.0)
    lse_j = tl.load(lse_ptr + b * N + offs_j, mask=col_ok, other=0.0)
    mass_i = tl.load(mass_ptr + b * N + offs_i, mask=row_ok, other=0.0)
    mass_j = tl.load(mass_ptr + b * N + offs_j, mask=col_ok, other=0.0)
    target_lse_i = tl.load(target_lse_ptr + b * N + offs_i, mask=row_ok, other=0.0)
    target_lse_j = tl.load(target_lse_ptr + b * N + offs_j, mask=col_ok, other=0.0)
    p_ij = _target_tile(t_ptr, row_scale_ptr, target_lse_i, offs_i, offs_j, N, QUANTIZED)
    p_ji = tl.trans(_target_tile(t_ptr, row_scale_ptr, target_lse_j, offs_j, offs_i, N, QUANTIZED))
    g = mass_i[:, None] * tl.exp(s - lse_i[:, None]) - p_ij + mass_j[None, :] * tl.exp(s - lse_j[None, :]) - p_ji
    g = g * (tl.load(grad_ptr) * scale)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + b * N * N + offs_i[:, None] * N + offs_j[None, :], g.to(out_ptr.dtype.element_ty), mask=ok)


def _constants(dtype: torch.dtype, quantized: bool) -> dict:
    return dict(QUANTIZED=quantized, DOT_PRECISION=dot_precision(dtype), UPCAST_DOT=INTERPRETED)


def pick_config(kernel: str, n: int, dim: int, kind: str) -> KernelConfig:
    """The pinned config of kernel "fwd" or "bwd" for [B, n, dim] tokens whose dots run on `kind`
    (`kernels._common.dot_operands`); see PINNED_CONFIGS."""
    return PINNED_CONFIGS.get((kernel, n, dim, kind), DEFAULT_CONFIGS[kind])


class RelationKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, target, row_scale):
        batch, n, dim = y.shape
        quantized = row_scale is not None
        row_scale_arg = row_scale if quantized else target  # never read when not quantized
        constants = _constants(y.dtype, quantized)
        scale = 1.0 / math.sqrt(dim)
        f32 = dict(device=y.device, dtype=torch.float32)
        cross, lse, mass, target_lse = (torch.empty(batch, n, **f32) for _ in range(4))
        config = pick_config("fwd", n, dim, dot_operands(y.dtype))
        launch(_relation_kl_fwd_kernel, (batch, triton.cdiv(n, config["BLOCK_I"])), config,
               y, target, row_scale_arg, cross, lse, mass, target_lse, n, dim, scale, **constants)
        ctx.save_for_backward(y, target, row_scale_arg, lse, mass, target_lse)
        ctx.constants, ctx.scale = constants, scale
        return (cross + mass * lse).sum() / (batch * n)

    @staticmethod
    def backward(ctx, grad_loss):
        y, target, row_scale_arg, lse, mass, target_lse = ctx.saved_tensors
        batch, n, dim = y.shape
        grad_scaled = (grad_loss.float() / (batch * n)).reshape(())
        grad_logits = torch.empty(batch, n, n, device=y.device, dtype=y.dtype)
        config = pick_config("bwd", n, dim, dot_operands(y.dtype))
        launch(_relation_kl_bwd_kernel, (batch, triton.cdiv(n, config["BLOCK_I"]), triton.cdiv(n, config["BLOCK_J"])),
               config, y, target, row_scale_arg, lse, mass, target_lse, grad_scaled, grad_logits, n, dim, ctx.scale,
               **ctx.constants)
        return torch.bmm(grad_logits, y), None, None


def relation_kl(y: torch.Tensor, target: torch.Tensor,
                target_row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fused `dpal.losses.relation_kl_reference` (same arguments; float32 scalar result)."""
    tensors = dict(y=y, target=target) | ({} if target_row_scale is None else dict(target_row_scale=target_row_scale))
    check_device(OP, **tensors)
    if y.dim() != 3 or y.shape[1] == 0 or y.shape[0] == 0 or y.shape[2] == 0:
        raise ValueError(f"{OP}: y must be a non-empty [B,N,D] tensor; got shape {tuple(y.shape)}")
    batch, n, _ = y.shape
    check_dtype(OP, "y", y)
    check_dtype(OP, "target", target, TARGET_DTYPES)
    check_shape(OP, "target", target, (batch, n, n))
    if (target.dtype == torch.int8) != (target_row_scale is not None):
        raise ValueError(f"{OP}: int8 targets need target_row_scale [B,N] (p = softmax(q * scale)) and float targets "
                         f"take none; got target {target.dtype} with "
                         f"{'no scale' if target_row_scale is None else 'a scale'}")
    if target_row_scale is not None:
        check_shape(OP, "target_row_scale", target_row_scale, (batch, n))
        check_dtype(OP, "target_row_scale", target_row_scale, (torch.float32, torch.float16, torch.bfloat16))
        target_row_scale = target_row_scale.contiguous()
    with torch.autocast(y.device.type, enabled=False):
        return RelationKLFunction.apply(y.contiguous(), target.contiguous(), target_row_scale)
