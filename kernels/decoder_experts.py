"""Fused decoder expert path: matches `dpal.decoder.expert_path_reference` without [B, P, D, D_o] tensors.

Math (c_e = s_e / mix_divisor, M = D * D_o, u = q_e W^T + b, g = GELU(u), per (b, e) mean mu_e and
reciprocal std r_e of g over all M values, xhat = (g - mu_e) r_e):

    W_b[m]   = gamma[m] * sum_e c_e xhat_e[m] + beta[m] * sum_e c_e
    loss     = weight * mean_b sum_m W_b[m]^2
    y        = LN_o(GELU(h @ W_b))

Forward: two passes of one GEMM-shaped kernel over tiles (samples x M), each recomputing u from q and W
in registers (each program holds its samples' queries and walks a slice of the column tiles, so that the
queries are read once per program and W once per block of samples): pass 1 writes per-tile variance
partials (mean, M2); pass 2 writes W_b [B, M], per-tile sums of W_b^2, and X = sum_e c_e xhat_e [B, M]
(compute dtype) for backward's dgamma. Between them a per-sample kernel merges the partials (Chan's
formula, float64) into (mu, r) and forms pass 2's per-sample constants (alpha_e = c_e r_e, sum_e alpha_e mu_e,
sum_e c_e), so the passes' per-element work is the dot's epilogue, one GELU and a few FMAs, and no torch op
runs between them. Nothing of size [B, P, M] is written, and none is saved: backward keeps q, s, the
parameters (the expert weight in the compute dtype, cast once in forward), (mu, r) [B, P] and X (it makes
W_b again from X where dW needs it; the output stage keeps W_b).

Backward, with dW = dL/dW_b + 2 weight / B * dloss * W_b:
    A_e = sum_m dW gamma xhat_e = r_e (sum_m dW gamma g_e - mu_e Bs),  Bs = sum_m dW gamma,
    C = sum_m dW beta,                                                   (grad_stats, recomputes u)
    dgamma = sum_b dW X,  dbeta = sum_b dW sum_e c_e                     (grad_stats, per block of samples)
    ds_e = (A_e + C) / mix_divisor                                       (per sample, from its partials)
    du_e = GELU'(u) * r_e c_e (dW gamma - Bs / M - xhat_e A_e / M)          (both passes below, recomputing u)
    dW_expert = du^T q                                                   (weight_grad: columns x all rows)
    dq = du W,  dbias = sum_{b,e} du_e                                   (query_grad: rows x a column slice)
grad_stats cannot be folded into the others: every du_e needs A_e, a sum over all M columns of a product
with dW, which exists only in backward. grad_stats also stores dW gamma [B, M] in the compute dtype, the
two du passes' only use of dW and gamma (its own sums use dW before that rounding). du is never written:
the two passes that need it make it in registers, tile by tile, and consume it in a second dot. The
weight-gradient pass owns column tiles and walks every block of (b, e) rows, so dW_expert rows come out
whole; it holds nothing else per column (the per-column sums are the other passes', which store them per
block of rows, summed after), so that its 64-column tiles fit the registers. The query-gradient pass owns
blocks of rows and a slice of the columns (`query_grad_slices`: the [B*P, D] output alone would give too few
programs to fill the GPU), and its float32 slices are summed after.

GELU is the exact (erf) one, evaluated once per element per pass, GELU and GELU' from one evaluation of
the normal tail (see `_normal_tail`).

The output stage is a batched cuBLAS GEMM z = h @ W_b and a fused GELU + LayerNorm row kernel; backward
recomputes z (one GEMM) rather than keeping [B, L, D_o] alive, unless z is small beside W_b (`keeps_output`:
L = 1, the stacked CLS call), and overwrites (a copy of) it with dz in place.

Memory kept from forward to backward: W_b and X ([B, D*D_o] each, compute dtype), the compute-dtype expert
weight when the parameter is float32, [B, P] statistics, and z where it is kept, beyond the inputs. Backward
adds dW gamma ([B, M], compute dtype), dq's slices ([slices, B*P, D] float32), the per-column partials (2 rows
per block of samples and 1 per block of (b, e) rows, of M float32) and [B, P] constants; one call launches 20
kernels, library GEMMs and small ops in all, whatever B.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels._common import (DOT_PRECISION, INTERPRETED, NAMESPACE, KernelConfig, PlannedLaunch, check_capability,
                             check_device, check_dtype, check_shape, dot_operands, fast_exp2, fast_rcp,
                             kernel_name, mma, multiprocessors, resident_programs)

OP = "fused expert path"

# Expert GEMM passes: rows are samples (one tl.dot and one accumulator per pattern query, each K step's W tile
# loaded once for the three; P = 3 rows per sample would not make a power-of-two tile), columns the D * D_o
# output features in tiles of _BLOCK_M (fixed: per-tile partial statistics are indexed by it), K the query
# width (D is a constexpr: no bounds checks when BLOCK_K divides it). Each program holds its BLOCK_B samples'
# queries (HOLD_QUERIES; Triton keeps them in shared memory) and walks a slice of the column tiles
# (`column_slices`), so the queries are read once per program and W once per block of samples. Configs are
# pinned per (kernel, D, M, dot operands) from the sm_90 compile facts (`make check-sm90`; README "Kernel
# configurations on sm_90"), never tuned at run time: the same shapes run the same code (and summation order)
# on every rank and resume. Rule for shapes off the table: the default of the operand kind. Tensor-core tiles
# keep 64 rows (one wgmma M per warpgroup); the passes take one warpgroup (with two, Triton gives the unrolled
# K steps' accumulators two layouts and converts between them), 64 columns (128 spill) and one pipeline stage
# (with two, the held queries and the weight tiles' buffers leave shared memory for one program per SM, not the
# two `column_slices` plans). At D = 384 the held queries with the unrolled K steps spill: they are loaded at
# each K step of a K loop instead.
# The two backward passes that make du in registers walk the query rows (b, e) flat, BLOCK_R at a time, and
# hold one operand whole (K_TILES tiles along D): the weight-gradient pass its BLOCK_M weight rows and a
# [D, BLOCK_M] fp32 gradient; the query-gradient pass its BLOCK_R query rows and a [BLOCK_R, D] fp32 dq. The
# weight-gradient pass takes one warpgroup, which keeps each dot's N whole (wgmma N = BLOCK_M or BLOCK_K);
# wider column tiles spill, and 64 columns fit only while it holds nothing else per column (no column sums, no
# gamma). The query-gradient pass takes two warpgroups on 128-row blocks (one 64-row wgmma M each), which
# halves its reads of the weight; it has room for them since it too holds no gamma. At D = 384 the fp32
# gradients take twice the registers: two warpgroups, 64-row blocks, with 64-column tiles for the weight
# gradient and 32-column ones for dq.
_BLOCK_M = 64
_BF16_PASS = KernelConfig.of(4, 1, BLOCK_B=64, BLOCK_K=64, HOLD_QUERIES=1)
_BF16_WEIGHT_GRAD = KernelConfig.of(4, 2, BLOCK_R=64, BLOCK_M=64, BLOCK_K=64)
_BF16_QUERY_GRAD = KernelConfig.of(8, 2, BLOCK_R=128, BLOCK_M=64, BLOCK_K=64)
DEFAULT_CONFIGS = {
    "stats": {"bf16": _BF16_PASS, "fp16": _BF16_PASS,
              "fp32": KernelConfig.of(8, 3, BLOCK_B=32, BLOCK_K=32, HOLD_QUERIES=1)},
    "weight_grad": {"bf16": _BF16_WEIGHT_GRAD, "fp16": _BF16_WEIGHT_GRAD,
                    "fp32": KernelConfig.of(4, 1, BLOCK_R=16, BLOCK_M=16, BLOCK_K=32)},
    "query_grad": {"bf16": _BF16_QUERY_GRAD, "fp16": _BF16_QUERY_GRAD,
                   "fp32": KernelConfig.of(4, 1, BLOCK_R=32, BLOCK_M=32, BLOCK_K=16)}}
DEFAULT_CONFIGS["mix"] = DEFAULT_CONFIGS["grad_stats"] = DEFAULT_CONFIGS["stats"]  # same GEMM, similar epilogues
FLAT_KERNELS = ("weight_grad", "query_grad")  # their tiles are all in the config (no fixed _BLOCK_M)
# The recipes' (D, D_o): ViT-Ti, ViT-B and the Swin students (192) or ViT-S (384), PATH-B (768) or
# PATH-L / SOLIDER-B (1024) teachers. Every recipe shape has its operand kind's default, but at D = 384: the
# passes load their queries at each K step; the flat backward passes' tensor-core tiles take two warpgroups
# (and dq's 32 columns). (The flat passes in IEEE fp32 keep narrow tiles at every shape: wider ones spill at
# the recipes' shapes, and at some of the tests' small ones under one Triton or the other.)
_WIDE_FLAT = {"weight_grad": KernelConfig.of(8, 2, BLOCK_R=64, BLOCK_M=64, BLOCK_K=64),
              "query_grad": KernelConfig.of(8, 2, BLOCK_R=64, BLOCK_M=32, BLOCK_K=64)}


def _recipe_config(kernel: str, dim: int, kind: str) -> KernelConfig:
    default = DEFAULT_CONFIGS[kernel][kind]
    if dim != 384 or (kernel in FLAT_KERNELS and kind == "fp32"):
        return default
    if kernel in FLAT_KERNELS:
        return _WIDE_FLAT[kernel]
    return default.with_tiles(HOLD_QUERIES=0)


PINNED_CONFIGS = {(kernel, dim, dim * out_dim, kind): _recipe_config(kernel, dim, kind)
                  for kernel, by_kind in DEFAULT_CONFIGS.items() for kind in by_kind
                  for dim, out_dim in ((192, 768), (192, 1024), (384, 768))}
# The per-sample kernels (Chan's merge and the mix constants; backward's constants): one program per sample
# walks its patterns' per-tile partials, BLOCK_T tiles at a time. No dots: a few float64 sums per sample.
_PER_SAMPLE_CONFIG = KernelConfig.of(4, 1, BLOCK_T=256)


# GELU(u) = u Phi(u) with the normal tail Q = 1 - Phi(|u|) from Abramowitz & Stegun 7.1.26 (erfc to 1.5e-7
# absolute): Q = poly(t) exp(-u^2/2), t = 1 / (1 + p |u| / sqrt 2). One reciprocal and one exp2 on the SFU and
# seven FMA-pipe instructions, where libdevice's erff takes two polynomials selected per element (about 30
# instructions, a third of them constant moves); exp(-u^2/2) is also GELU's derivative's density term.
_TAIL_P = tl.constexpr(0.3275911 * 0.7071067811865476)
_TAIL_A1 = tl.constexpr(0.5 * 0.254829592)  # the 1/2 of Q = erfc / 2 folded in
_TAIL_A2 = tl.constexpr(0.5 * -0.284496736)
_TAIL_A3 = tl.constexpr(0.5 * 1.421413741)
_TAIL_A4 = tl.constexpr(0.5 * -1.453152027)
_TAIL_A5 = tl.constexpr(0.5 * 1.061405429)
_HALF_SQUARE_LOG2E = tl.constexpr(-0.5 * 1.4426950408889634)  # exp(-u^2/2) = 2^(u^2 * this)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _normal_tail(u, INTERPRETED: tl.constexpr):
    """(Q, e): Q = P(Z > |u|) for a standard normal Z, and e = exp(-u^2 / 2), fp32."""
    t = fast_rcp(1.0 + tl.abs(u) * _TAIL_P, INTERPRETED)
    e = fast_exp2(u * u * _HALF_SQUARE_LOG2E, INTERPRETED)
    poly = ((((_TAIL_A5 * t + _TAIL_A4) * t + _TAIL_A3) * t + _TAIL_A2) * t + _TAIL_A1) * t
    return poly * e, e


@triton.jit
def _gelu(u, INTERPRETED: tl.constexpr):
    """Exact (erf) GELU: u Phi(u) = max(u, 0) - |u| Q."""
    tail, _ = _normal_tail(u, INTERPRETED)
    return tl.maximum(u, 0.0) - tl.abs(u) * tail


@triton.jit
def _gelu_and_grad(u, INTERPRETED: tl.constexpr):
    """(GELU(u), GELU'(u) = Phi(u) + u phi(u)) from one evaluation of the normal tail."""
    tail, e = _normal_tail(u, INTERPRETED)
    cdf = tl.where(u >= 0.0, 1.0 - tail, tail)
    return u * cdf, cdf + u * e * _INV_SQRT_2PI


@triton.jit
def _columns(ptr, offs_m, M, EVEN_M: tl.constexpr):
    """A slice of a per-column vector at columns offs_m, as fp32 (0 past M unless EVEN_M says none is)."""
    if EVEN_M:
        v = tl.load(ptr + offs_m)
    else:
        v = tl.load(ptr + offs_m, mask=offs_m < M, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _row_value(ptr, offs_b, row_ok):
    """One fp32 value per sample of a per-sample buffer (0 past B)."""
    return tl.load(ptr + offs_b, mask=row_ok, other=0.0).to(tl.float32)


@triton.jit
def _slice(span, stop):
    """[start, end) of this program's slice of the columns (or column tiles): the one of width `span` at
    program_id(1), cut at `stop`."""
    start = tl.program_id(1) * span
    return start, tl.minimum(start + span, stop)


@triton.jit
def _held_queries(q_ptr, offs_b, row_ok, P: tl.constexpr, D: tl.constexpr, BLOCK_K: tl.constexpr,
                  K_TILES: tl.constexpr, HOLD_QUERIES: tl.constexpr):
    """The queries of samples offs_b, all P patterns, as P * K_TILES tiles [BLOCK_B, BLOCK_K] (pattern-major;
    0 past B and past D), held by a program while it walks its column tiles; () unless HOLD_QUERIES."""
    tiles = ()
    if HOLD_QUERIES:
        for e in tl.static_range(P):
            tiles = tiles + _k_tiles(q_ptr + e * D, offs_b * P, row_ok, D, BLOCK_K, K_TILES)
    return tiles


@triton.jit
def _preactivations(held, q_ptr, w_ptr, bias, offs_b, offs_m, B, M, P: tl.constexpr, D: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
                    HOLD_QUERIES: tl.constexpr, EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    INTERPRETED: tl.constexpr):
    """(u_0, ..., u_{P-1}), u_e = q[b, e] . W[m] + bias[m], for samples offs_b x the column tile offs_m, fp32.
    One accumulator per pattern: each K step loads the W tile once and feeds it to the P dots. The queries come
    from `held` (`_held_queries`; K unrolled), or, unless HOLD_QUERIES, are loaded at each K step of a K loop
    (where holding them would take more registers than there are: D = 384)."""
    accs = ()
    for e in tl.static_range(P):
        accs = accs + (tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32),)
    col_ok = (offs_m < M)[None, :]
    if HOLD_QUERIES:
        for k in tl.static_range(K_TILES):
            w = _weight_tile(w_ptr, offs_m, col_ok, k * BLOCK_K + tl.arange(0, BLOCK_K), D, BLOCK_K, EVEN_M)
            stepped = ()
            for e in tl.static_range(P):
                stepped = stepped + (mma(held[e * K_TILES + k], w, accs[e], DOT_PRECISION, INTERPRETED),)
            accs = stepped
    else:
        row_ok = (offs_b < B)[:, None]
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = _weight_tile(w_ptr, offs_m, col_ok, offs_k, D, BLOCK_K, EVEN_M)
            q_mask = row_ok & (offs_k < D)[None, :] if D % BLOCK_K else row_ok
            stepped = ()
            for e in tl.static_range(P):
                q = tl.load(q_ptr + ((offs_b * P + e) * D)[:, None] + offs_k[None, :], mask=q_mask, other=0.0)
                stepped = stepped + (mma(q, w, accs[e], DOT_PRECISION, INTERPRETED),)
            accs = stepped
    preactivations = ()
    for e in tl.static_range(P):
        preactivations = preactivations + (accs[e] + bias[None, :],)
    return preactivations


@triton.jit
def _weight_tile(w_ptr, offs_m, col_ok, offs_k, D: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_M: tl.constexpr):
    """W[offs_m, offs_k] transposed, [BLOCK_K, BLOCK_M] (0 past M and past D)."""
    w_at = w_ptr + (offs_m * D)[None, :] + offs_k[:, None]
    if EVEN_M and D % BLOCK_K == 0:
        return tl.load(w_at)
    return tl.load(w_at, mask=col_ok if D % BLOCK_K == 0 else (offs_k < D)[:, None] & col_ok, other=0.0)


@triton.jit
def _expert_stats_kernel(q_ptr, w_ptr, bias_ptr, tile_mean_ptr, tile_m2_ptr, B, M, n_tiles, span,
                         P: tl.constexpr, D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, HOLD_QUERIES: tl.constexpr,
                         EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Per (b, e, column tile): mean and sum of squared deviations of GELU(u) over the tile's columns."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = offs_b < B
    held = _held_queries(q_ptr, offs_b, row_ok, P, D, BLOCK_K, K_TILES, HOLD_QUERIES)
    first, end = _slice(span, n_tiles)
    for tile in range(first, end):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = (offs_m < M)[None, :]
        count = BLOCK_M if EVEN_M else tl.minimum(M - tile * BLOCK_M, BLOCK_M).to(tl.float32)
        u = _preactivations(held, q_ptr, w_ptr, _columns(bias_ptr, offs_m, M, EVEN_M), offs_b, offs_m, B, M, P, D,
                            BLOCK_B, BLOCK_M, BLOCK_K, K_TILES, HOLD_QUERIES, EVEN_M, DOT_PRECISION, INTERPRETED)
        for e in tl.static_range(P):
            g = _gelu(u[e], INTERPRETED)
            if not EVEN_M:
                g = tl.where(col_ok, g, 0.0)
            tile_mean = tl.sum(g, axis=1) / count
            dev = g - tile_mean[:, None]
            if not EVEN_M:
                dev = tl.where(col_ok, dev, 0.0)
            out = (offs_b * P + e) * n_tiles + tile
            tl.store(tile_mean_ptr + out, tile_mean, mask=row_ok)
            tl.store(tile_m2_ptr + out, tl.sum(dev * dev, axis=1), mask=row_ok)


@triton.jit
def _tile_sum(ptr, n_tiles, BLOCK_T: tl.constexpr):
    """Sum of n_tiles consecutive fp32 per-tile partials, in float64: exact enough for any D*D_o."""
    total = tl.zeros((BLOCK_T,), dtype=tl.float64)
    for t0 in range(0, n_tiles, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        total += tl.load(ptr + tiles, mask=tiles < n_tiles, other=0.0).to(tl.float64)
    return tl.sum(total, axis=0)


@triton.jit
def _tile_means(tile_mean_ptr, t0, M, n_tiles, TILE_COLUMNS: tl.constexpr, BLOCK_T: tl.constexpr):
    """(mean, column count) of tiles t0 .. t0 + BLOCK_T - 1 of the stats pass in float64 (0 past n_tiles)."""
    tiles = t0 + tl.arange(0, BLOCK_T)
    ok = tiles < n_tiles
    count = tl.where(ok, tl.minimum(M - tiles * TILE_COLUMNS, TILE_COLUMNS), 0).to(tl.float64)
    return tl.load(tile_mean_ptr + tiles, mask=ok, other=0.0).to(tl.float64), count


@triton.jit
def _expert_stats_merge_kernel(tile_mean_ptr, tile_m2_ptr, scores_ptr, mean_ptr, rstd_ptr, alpha_ptr, offset_ptr,
                               c_sum_ptr, M, n_tiles, mix_divisor, eps, P: tl.constexpr, TILE_COLUMNS: tl.constexpr,
                               BLOCK_T: tl.constexpr):
    """One sample: Chan's merge of the stats pass's per-tile (count, mean, M2) into mu_e and r_e = 1 / sqrt(var_e
    + eps) in float64, and the mix pass's constants alpha_e = c_e r_e, offset = sum_e alpha_e mu_e and c_sum =
    sum_e c_e (c_e = s_e / mix_divisor)."""
    b = tl.program_id(0)
    offset = 0.0
    c_sum = 0.0
    for e in tl.static_range(P):
        row = (b * P + e) * n_tiles
        weighted = tl.zeros((BLOCK_T,), dtype=tl.float64)
        for t0 in range(0, n_tiles, BLOCK_T):
            tile_mean, count = _tile_means(tile_mean_ptr + row, t0, M, n_tiles, TILE_COLUMNS, BLOCK_T)
            weighted += tile_mean * count
        mean = tl.sum(weighted, axis=0) / M
        spread = tl.zeros((BLOCK_T,), dtype=tl.float64)  # sum over tiles of count * (tile mean - mean)^2
        for t0 in range(0, n_tiles, BLOCK_T):
            tile_mean, count = _tile_means(tile_mean_ptr + row, t0, M, n_tiles, TILE_COLUMNS, BLOCK_T)
            spread += (tile_mean - mean) * (tile_mean - mean) * count
        m2 = _tile_sum(tile_m2_ptr + row, n_tiles, BLOCK_T) + tl.sum(spread, axis=0)
        rstd = (1.0 / tl.sqrt(m2 / M + eps)).to(tl.float32)
        mean = mean.to(tl.float32)
        c = tl.load(scores_ptr + b * P + e).to(tl.float32) / mix_divisor
        alpha = c * rstd
        tl.store(mean_ptr + b * P + e, mean)
        tl.store(rstd_ptr + b * P + e, rstd)
        tl.store(alpha_ptr + b * P + e, alpha)
        offset += alpha * mean
        c_sum += c
    tl.store(offset_ptr + b, offset)
    tl.store(c_sum_ptr + b, c_sum)


@triton.jit
def _expert_mix_kernel(q_ptr, w_ptr, bias_ptr, alpha_ptr, offset_ptr, c_sum_ptr, gamma_ptr, beta_ptr,
                       mixed_ptr, normalized_ptr, sq_partial_ptr, B, M, n_tiles, span, loss_scale,
                       P: tl.constexpr, D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, HOLD_QUERIES: tl.constexpr,
                       EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """W_b tile = gamma * (sum_e alpha_e g_e - offset) + beta * c_sum, plus per-tile row sums of W_b^2 times
    loss_scale = weight / B (so that the loss is the sum of the partials), with
    alpha_e = c_e r_e, offset = sum_e alpha_e mu_e and c_sum = sum_e c_e per sample (so that
    sum_e alpha_e g_e - offset = sum_e c_e xhat_e). It also stores that mix of the normalized experts,
    sum_e c_e xhat_e, in the compute dtype: backward's LN_E weight gradient is its sum weighted by dW."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = offs_b < B
    held = _held_queries(q_ptr, offs_b, row_ok, P, D, BLOCK_K, K_TILES, HOLD_QUERIES)
    alphas = ()
    for e in tl.static_range(P):
        alphas = alphas + (_row_value(alpha_ptr, offs_b * P + e, row_ok),)
    offset = _row_value(offset_ptr, offs_b, row_ok)
    c_sum = _row_value(c_sum_ptr, offs_b, row_ok)
    first, end = _slice(span, n_tiles)
    for tile in range(first, end):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        u = _preactivations(held, q_ptr, w_ptr, _columns(bias_ptr, offs_m, M, EVEN_M), offs_b, offs_m, B, M, P, D,
                            BLOCK_B, BLOCK_M, BLOCK_K, K_TILES, HOLD_QUERIES, EVEN_M, DOT_PRECISION, INTERPRETED)
        acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
        for e in tl.static_range(P):
            acc += alphas[e][:, None] * _gelu(u[e], INTERPRETED)
        gamma = _columns(gamma_ptr, offs_m, M, EVEN_M)
        beta = _columns(beta_ptr, offs_m, M, EVEN_M)
        normalized = acc - offset[:, None]
        mixed = _mixed_weight(normalized, gamma, beta, c_sum).to(mixed_ptr.dtype.element_ty)
        at, ok = _mixed_offsets(offs_b, offs_m, B, M, EVEN_M)
        tl.store(mixed_ptr + at, mixed, mask=ok)
        tl.store(normalized_ptr + at, normalized.to(normalized_ptr.dtype.element_ty), mask=ok)
        # The loss is taken of the stored (rounded) W_b, the same values backward differentiates through; rows
        # past B hold c_sum = offset = 0, so W_b = 0 there, and columns past M have gamma = beta = 0.
        stored = mixed.to(tl.float32)
        tl.store(sq_partial_ptr + offs_b * n_tiles + tile, tl.sum(stored * stored, axis=1) * loss_scale,
                 mask=row_ok)


@triton.jit
def _mixed_weight(normalized, gamma, beta, c_sum):
    """W_b = gamma * X + beta * sum_e c_e for a tile of X = sum_e c_e xhat_e (rows: samples, columns: gamma's and
    beta's), fp32: the mix pass makes it to store it, grad_stats again from the stored X instead of reading it."""
    return normalized * gamma[None, :] + c_sum[:, None] * beta[None, :]


@triton.jit
def _loss_coefficient(grad_loss_ptr, loss_scale):
    """(2 weight / B) dloss: what dW adds per unit of W_b for the experts loss (loss_scale = 2 weight / B)."""
    return tl.load(grad_loss_ptr).to(tl.float32) * loss_scale


@triton.jit
def _mixed_offsets(offs_b, offs_m, B, M, EVEN_M: tl.constexpr):
    """(offsets, mask) of a tile of a [B, M] array at rows offs_b (samples, repeats allowed), columns offs_m."""
    ok = (offs_b < B)[:, None] if EVEN_M else (offs_b < B)[:, None] & (offs_m < M)[None, :]
    return offs_b[:, None] * M + offs_m[None, :], ok


@triton.jit
def _load_mixed_tile(ptr, offs_b, offs_m, B, M, EVEN_M: tl.constexpr):
    """A tile of a [B, M] array (W_b, dL/dW_b, X, dW gamma) at rows offs_b, columns offs_m, fp32 (0 outside B
    and M)."""
    at, ok = _mixed_offsets(offs_b, offs_m, B, M, EVEN_M)
    return tl.load(ptr + at, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _expert_grad_stats_kernel(q_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, grad_ptr, normalized_ptr, grad_loss_ptr,
                              scores_ptr, scaled_grad_ptr, partial_ptr, column_partial_ptr,
                              B, M, n_tiles, span, loss_scale, mix_divisor,
                              P: tl.constexpr, D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, HOLD_QUERIES: tl.constexpr,
                              EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Per (b, column tile), with dW = dL/dW_b + (2 weight / B) dloss W_b: the sums sum dW gamma g_e (slots
    0..P-1), sum dW gamma (P), sum dW beta (P+1), from which the caller forms A_e = sum dW gamma xhat_e =
    r_e (slot e - mu_e slot P); dW gamma stored in the compute dtype for the du passes (their only use of dW and
    gamma); and this block of samples' share of LN_E's parameter gradients, into column_partial[s, block] (fp32;
    the caller sums the blocks): s = 0 dgamma = sum_b dW sum_e c_e xhat_e (the mix pass stored the last sum),
    s = 1 dbeta = sum_b dW sum_e c_e. The sums use dW in fp32, before the stored value's rounding (A_e is a
    difference of two sums, which that rounding's error would dominate). W_b is not read: it is made again from
    X = sum_e c_e xhat_e as the mix pass made it, gamma X + beta sum_e c_e (from X rounded to the compute dtype,
    which differs from the stored W_b's rounding by about one unit in the last place of each)."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = offs_b < B
    loss_coef = _loss_coefficient(grad_loss_ptr, loss_scale)
    held = _held_queries(q_ptr, offs_b, row_ok, P, D, BLOCK_K, K_TILES, HOLD_QUERIES)
    c_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for e in tl.static_range(P):
        c_sum += _row_value(scores_ptr, offs_b * P + e, row_ok) / mix_divisor
    column_rows = column_partial_ptr + tl.program_id(0) * M
    first, end = _slice(span, n_tiles)
    for tile in range(first, end):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = offs_m < M
        gamma = _columns(gamma_ptr, offs_m, M, EVEN_M)
        beta = _columns(beta_ptr, offs_m, M, EVEN_M)
        normalized = _load_mixed_tile(normalized_ptr, offs_b, offs_m, B, M, EVEN_M)
        mixed = _mixed_weight(normalized, gamma, beta, c_sum)  # 0 past B (X and c_sum are) and M (gamma, beta are)
        d_mixed = _load_mixed_tile(grad_ptr, offs_b, offs_m, B, M, EVEN_M) + loss_coef * mixed
        tl.store(column_rows + offs_m, tl.sum(d_mixed * normalized, axis=0), mask=col_ok)
        tl.store(column_rows + tl.num_programs(0) * M + offs_m, tl.sum(d_mixed * c_sum[:, None], axis=0),
                 mask=col_ok)
        d_gamma_scaled = d_mixed * gamma[None, :]
        at, ok = _mixed_offsets(offs_b, offs_m, B, M, EVEN_M)
        tl.store(scaled_grad_ptr + at, d_gamma_scaled.to(scaled_grad_ptr.dtype.element_ty), mask=ok)
        slot = offs_b * (P + 2) * n_tiles + tile
        tl.store(partial_ptr + slot + P * n_tiles, tl.sum(d_gamma_scaled, axis=1), mask=row_ok)
        tl.store(partial_ptr + slot + (P + 1) * n_tiles, tl.sum(d_mixed * beta[None, :], axis=1), mask=row_ok)
        u = _preactivations(held, q_ptr, w_ptr, _columns(bias_ptr, offs_m, M, EVEN_M), offs_b, offs_m, B, M, P, D,
                            BLOCK_B, BLOCK_M, BLOCK_K, K_TILES, HOLD_QUERIES, EVEN_M, DOT_PRECISION, INTERPRETED)
        for e in tl.static_range(P):
            tl.store(partial_ptr + slot + e * n_tiles, tl.sum(d_gamma_scaled * _gelu(u[e], INTERPRETED), axis=1),
                     mask=row_ok)


@triton.jit
def _expert_grad_constants_kernel(partial_ptr, scores_ptr, mean_ptr, rstd_ptr, grad_scores_ptr, row_shift_ptr,
                                  alpha_ptr, du_const_ptr, du_slope_ptr, M, n_tiles, mix_divisor, P: tl.constexpr,
                                  BLOCK_T: tl.constexpr):
    """One sample: the grad_stats pass's per-tile sums summed in float64, then ds_e = (A_e + C) / mix_divisor
    with A_e = r_e (sum dW gamma g_e - mu_e sum dW gamma) and C = sum dW beta, and the du pass's per-sample
    constants: with base = dW gamma - row_shift (row_shift = sum_m dW gamma / M), the LayerNorm backward
    du_e = GELU'(u) r_e c_e (dW gamma - sum dW gamma / M - xhat_e A_e / M) is
    du_e = GELU'(u) (alpha_e base + du_const_e + du_slope_e g_e) (see `_pre_norm_grad`)."""
    b = tl.program_id(0)
    slots = partial_ptr + b * (P + 2) * n_tiles
    gamma_sum = _tile_sum(slots + P * n_tiles, n_tiles, BLOCK_T)
    beta_sum = _tile_sum(slots + (P + 1) * n_tiles, n_tiles, BLOCK_T).to(tl.float32)
    tl.store(row_shift_ptr + b, (gamma_sum / M).to(tl.float32))
    for e in tl.static_range(P):
        mean = tl.load(mean_ptr + b * P + e)
        rstd = tl.load(rstd_ptr + b * P + e)
        a = (rstd.to(tl.float64) * (_tile_sum(slots + e * n_tiles, n_tiles, BLOCK_T)
                                    - mean.to(tl.float64) * gamma_sum)).to(tl.float32)
        tl.store(grad_scores_ptr + b * P + e, ((a + beta_sum) / mix_divisor).to(grad_scores_ptr.dtype.element_ty))
        c = tl.load(scores_ptr + b * P + e).to(tl.float32) / mix_divisor
        alpha = c * rstd
        a_rstd = a / M * rstd
        tl.store(alpha_ptr + b * P + e, alpha)
        tl.store(du_const_ptr + b * P + e, alpha * a_rstd * mean)
        tl.store(du_slope_ptr + b * P + e, -alpha * a_rstd)


# The kernels that run one program per sample over the per-tile partials (_PER_SAMPLE_CONFIG; no dots).
PER_SAMPLE_KERNELS = (kernel_name(_expert_stats_merge_kernel), kernel_name(_expert_grad_constants_kernel))


@triton.jit
def _k_tiles(ptr, rows, row_ok, D: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr):
    """Rows `rows` of a row-major [*, D] matrix as K_TILES tiles [len(rows), BLOCK_K] along D (0 outside row_ok
    and past D): a whole operand held across a loop that uses it again and again."""
    tiles = ()
    for k in tl.static_range(K_TILES):
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] if D % BLOCK_K == 0 else row_ok[:, None] & (offs_k < D)[None, :]
        tiles = tiles + (tl.load(ptr + rows[:, None] * D + offs_k[None, :], mask=ok, other=0.0),)
    return tiles


@triton.jit
def _flat_preactivations(q_tiles, w_tiles, bias, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                         K_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """u = q W^T + bias for a tile of query rows (b, e) x output features, from their K tiles, fp32."""
    u = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for k in tl.static_range(K_TILES):
        u = mma(q_tiles[k], tl.trans(w_tiles[k]), u, DOT_PRECISION, INTERPRETED)
    return u + bias[None, :]


@triton.jit
def _pre_norm_grad(u, scaled_grad, row_shift, alpha, du_const, du_slope, INTERPRETED: tl.constexpr):
    """du of a tile of query rows (b, e) x columns, the LayerNorm backward du = GELU'(u) (alpha base + du_const +
    du_slope GELU(u)), base = dW gamma - row_shift (see `_expert_grad_constants_kernel`; scaled_grad is dW gamma
    at each row's sample)."""
    g, slope = _gelu_and_grad(u, INTERPRETED)
    base = scaled_grad - row_shift[:, None]
    return slope * (alpha[:, None] * base + du_const[:, None] + du_slope[:, None] * g)


@triton.jit
def _expert_weight_grad_kernel(q_ptr, w_ptr, bias_ptr, scaled_grad_ptr, row_shift_ptr, alpha_ptr, du_const_ptr,
                               du_slope_ptr, d_weight_ptr, B, M,
                               P: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, EVEN_M: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """The Linear's weight rows dW_expert[m] = sum_rows du[row, m] q[row] at BLOCK_M output features (rows are
    (b, e)). The program keeps its weight tile and walks every block of query rows, recomputing u and du there;
    du never leaves the registers. The per-column sums are the other passes' (the bias's the query-gradient
    pass's, LN_E's grad_stats'): their accumulators, and a held gamma, would take the registers that 64-column
    tiles need."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = offs_m < M
    bias = _columns(bias_ptr, offs_m, M, EVEN_M)
    w_tiles = _k_tiles(w_ptr, offs_m, col_ok, D, BLOCK_K, K_TILES)
    d_weight = ()  # transposed, [BLOCK_K, BLOCK_M] per K tile: the dot's 64 rows run along D
    for k in tl.static_range(K_TILES):
        d_weight = d_weight + (tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32),)
    for r0 in range(0, B * P, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < B * P
        samples = rows // P
        q_tiles = _k_tiles(q_ptr, rows, row_ok, D, BLOCK_K, K_TILES)
        u = _flat_preactivations(q_tiles, w_tiles, bias, BLOCK_R, BLOCK_M, K_TILES, DOT_PRECISION, INTERPRETED)
        du = _pre_norm_grad(u, _load_mixed_tile(scaled_grad_ptr, samples, offs_m, B, M, EVEN_M),
                            _row_value(row_shift_ptr, samples, row_ok), _row_value(alpha_ptr, rows, row_ok),
                            _row_value(du_const_ptr, rows, row_ok), _row_value(du_slope_ptr, rows, row_ok),
                            INTERPRETED)  # 0 past the rows
        du = du.to(q_ptr.dtype.element_ty)
        stepped = ()
        for k in tl.static_range(K_TILES):
            stepped = stepped + (mma(tl.trans(q_tiles[k]), du, d_weight[k], DOT_PRECISION, INTERPRETED),)
        d_weight = stepped
    for k in tl.static_range(K_TILES):
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = col_ok[:, None] if D % BLOCK_K == 0 else col_ok[:, None] & (offs_k < D)[None, :]
        tl.store(d_weight_ptr + offs_m[:, None] * D + offs_k[None, :],
                 tl.trans(d_weight[k]).to(d_weight_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _expert_query_grad_kernel(q_ptr, w_ptr, bias_ptr, scaled_grad_ptr, row_shift_ptr, alpha_ptr, du_const_ptr,
                              du_slope_ptr, dq_partial_ptr, bias_partial_ptr, B, M, span,
                              P: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, EVEN_M: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """One slice of dq = du W for BLOCK_R query rows (b, e): sum over the columns [split * span, (split + 1) *
    span) of du[row, m] W[m], into dq_partial[split] (fp32; the caller sums the slices). The program keeps its
    query rows and walks the slice's column tiles, recomputing u and du there (du never leaves the registers);
    the slices give the [B*P, D] product enough programs to fill the GPU. Each column tile also stores its rows'
    share of the expert bias gradient, sum_rows du, into bias_partial[row block] (fp32; the caller sums them)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    row_ok = rows < B * P
    samples = rows // P
    q_tiles = _k_tiles(q_ptr, rows, row_ok, D, BLOCK_K, K_TILES)
    row_shift = _row_value(row_shift_ptr, samples, row_ok)
    alpha = _row_value(alpha_ptr, rows, row_ok)  # 0 past the rows, as is du
    du_const = _row_value(du_const_ptr, rows, row_ok)
    du_slope = _row_value(du_slope_ptr, rows, row_ok)
    dq = ()
    for k in tl.static_range(K_TILES):
        dq = dq + (tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32),)
    first, end = _slice(span, M)
    for m0 in range(first, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        col_ok = offs_m < M
        w_tiles = _k_tiles(w_ptr, offs_m, col_ok, D, BLOCK_K, K_TILES)  # 0 past M: those columns add nothing
        u = _flat_preactivations(q_tiles, w_tiles, _columns(bias_ptr, offs_m, M, EVEN_M), BLOCK_R, BLOCK_M,
                                 K_TILES, DOT_PRECISION, INTERPRETED)
        du = _pre_norm_grad(u, _load_mixed_tile(scaled_grad_ptr, samples, offs_m, B, M, EVEN_M), row_shift, alpha,
                            du_const, du_slope, INTERPRETED)
        tl.store(bias_partial_ptr + tl.program_id(0) * M + offs_m, tl.sum(du, axis=0), mask=col_ok)
        du = du.to(q_ptr.dtype.element_ty)
        stepped = ()
        for k in tl.static_range(K_TILES):
            stepped = stepped + (mma(du, w_tiles[k], dq[k], DOT_PRECISION, INTERPRETED),)
        dq = stepped
    for k in tl.static_range(K_TILES):
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] if D % BLOCK_K == 0 else row_ok[:, None] & (offs_k < D)[None, :]
        tl.store(dq_partial_ptr + (split * B * P + rows)[:, None] * D + offs_k[None, :], dq[k], mask=ok)


# The passes that hold their samples' queries and walk a slice of column tiles (`column_slices`).
HELD_KERNEL_NAMES = (kernel_name(_expert_stats_kernel), kernel_name(_expert_mix_kernel),
                     kernel_name(_expert_grad_stats_kernel))
# The flat backward passes (FLAT_KERNELS' configs): two GEMMs per step, u and then dW or dq.
FLAT_KERNEL_NAMES = (kernel_name(_expert_weight_grad_kernel), kernel_name(_expert_query_grad_kernel))


# The output LayerNorm rows: D_o = 768 is 3 x 256, so a row is held as NUM_SEG segments of SEG columns (a tuple
# of [BLOCK_R, SEG] tiles) instead of one tile padded to 1024, which would spend a quarter of every
# instruction on padding. Each warp holds whole rows, so the row sums need no shared memory.


@triton.jit
def _row_tiles(ptr, rows, cols, row_ok, width, SEG: tl.constexpr, NUM_SEG: tl.constexpr, EVEN_W: tl.constexpr):
    """A [BLOCK_R, width] block of rows as NUM_SEG fp32 [BLOCK_R, SEG] tiles (0 outside rows and width)."""
    tiles = ()
    for s in tl.static_range(NUM_SEG):
        at = s * SEG + cols
        ok = row_ok[:, None] if EVEN_W else row_ok[:, None] & (at < width)[None, :]
        tiles = tiles + (tl.load(ptr + rows[:, None] * width + at[None, :], mask=ok, other=0.0).to(tl.float32),)
    return tiles


@triton.jit
def _column_tiles(ptr, cols, width, SEG: tl.constexpr, NUM_SEG: tl.constexpr, EVEN_W: tl.constexpr):
    """A per-column vector as NUM_SEG fp32 [SEG] slices (0 past width)."""
    tiles = ()
    for s in tl.static_range(NUM_SEG):
        at = s * SEG + cols
        tiles = tiles + (_columns(ptr, at, width, EVEN_W),)
    return tiles


@triton.jit
def _store_rows(ptr, tiles, rows, cols, row_ok, width, SEG: tl.constexpr, NUM_SEG: tl.constexpr,
                EVEN_W: tl.constexpr):
    for s in tl.static_range(NUM_SEG):
        at = s * SEG + cols
        ok = row_ok[:, None] if EVEN_W else row_ok[:, None] & (at < width)[None, :]
        tl.store(ptr + rows[:, None] * width + at[None, :], tiles[s].to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gelu_layer_norm_rows(z, cols, width, eps, BLOCK_R: tl.constexpr, SEG: tl.constexpr, NUM_SEG: tl.constexpr,
                          EVEN_W: tl.constexpr, GRAD: tl.constexpr, INTERPRETED: tl.constexpr):
    """xhat = LN(GELU(z)) of a block of rows before the affine part (tiles, 0 past width), 1/std per row, and
    with GRAD the tiles of GELU'(z)."""
    acts = ()
    slopes = ()
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for s in tl.static_range(NUM_SEG):
        if GRAD:
            a, slope = _gelu_and_grad(z[s], INTERPRETED)
            slopes = slopes + (slope,)
        else:
            a = _gelu(z[s], INTERPRETED)
        if not EVEN_W:
            a = tl.where((s * SEG + cols < width)[None, :], a, 0.0)
        acts = acts + (a,)
        total += tl.sum(a, axis=1)
    mean = total / width
    devs = ()
    square = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for s in tl.static_range(NUM_SEG):
        dev = acts[s] - mean[:, None]
        if not EVEN_W:
            dev = tl.where((s * SEG + cols < width)[None, :], dev, 0.0)
        devs = devs + (dev,)
        square += tl.sum(dev * dev, axis=1)
    rstd = tl.math.rsqrt(square / width + eps)
    xhat = ()
    for s in tl.static_range(NUM_SEG):
        xhat = xhat + (devs[s] * rstd[:, None],)
    return xhat, rstd, slopes


@triton.jit
def _gelu_layer_norm_fwd_kernel(z_ptr, y_ptr, w_ptr, b_ptr, n_rows, width, eps, BLOCK_R: tl.constexpr,
                                SEG: tl.constexpr, NUM_SEG: tl.constexpr, EVEN_W: tl.constexpr,
                                INTERPRETED: tl.constexpr):
    """A block of BLOCK_R rows: y = LN(GELU(z)) * w + b."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, SEG)
    row_ok = rows < n_rows
    z = _row_tiles(z_ptr, rows, cols, row_ok, width, SEG, NUM_SEG, EVEN_W)
    w = _column_tiles(w_ptr, cols, width, SEG, NUM_SEG, EVEN_W)
    b = _column_tiles(b_ptr, cols, width, SEG, NUM_SEG, EVEN_W)
    xhat, _, _ = _gelu_layer_norm_rows(z, cols, width, eps, BLOCK_R, SEG, NUM_SEG, EVEN_W, False, INTERPRETED)
    y = ()
    for s in tl.static_range(NUM_SEG):
        y = y + (xhat[s] * w[s][None, :] + b[s][None, :],)
    _store_rows(y_ptr, y, rows, cols, row_ok, width, SEG, NUM_SEG, EVEN_W)


@triton.jit
def _gelu_layer_norm_bwd_kernel(z_ptr, dy_ptr, w_ptr, dw_partial_ptr, db_partial_ptr, n_rows, width, eps,
                                blocks_per_program, BLOCK_R: tl.constexpr, SEG: tl.constexpr,
                                NUM_SEG: tl.constexpr, EVEN_W: tl.constexpr, INTERPRETED: tl.constexpr):
    """Row blocks [pid * blocks_per_program, ...) of BLOCK_R rows: overwrites z with dz (each block is read
    before it is written) and writes per-program dw/db partials. Row statistics are recomputed from z."""
    pid = tl.program_id(0)
    cols = tl.arange(0, SEG)
    w = _column_tiles(w_ptr, cols, width, SEG, NUM_SEG, EVEN_W)
    dw = ()
    db = ()
    for s in tl.static_range(NUM_SEG):
        dw = dw + (tl.zeros((BLOCK_R, SEG), dtype=tl.float32),)
        db = db + (tl.zeros((BLOCK_R, SEG), dtype=tl.float32),)
    first = pid * blocks_per_program
    n_blocks = tl.cdiv(n_rows, BLOCK_R)
    for block in range(first, tl.minimum(first + blocks_per_program, n_blocks)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        z = _row_tiles(z_ptr, rows, cols, row_ok, width, SEG, NUM_SEG, EVEN_W)
        dy = _row_tiles(dy_ptr, rows, cols, row_ok, width, SEG, NUM_SEG, EVEN_W)
        xhat, rstd, slopes = _gelu_layer_norm_rows(z, cols, width, eps, BLOCK_R, SEG, NUM_SEG, EVEN_W, True,
                                                   INTERPRETED)
        mean_dxhat = tl.zeros((BLOCK_R,), dtype=tl.float32)
        mean_dxhat_xhat = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for s in tl.static_range(NUM_SEG):
            dxhat = dy[s] * w[s][None, :]
            mean_dxhat += tl.sum(dxhat, axis=1)
            mean_dxhat_xhat += tl.sum(dxhat * xhat[s], axis=1)
        mean_dxhat = mean_dxhat / width
        mean_dxhat_xhat = mean_dxhat_xhat / width
        dz = ()
        new_dw = ()
        new_db = ()
        for s in tl.static_range(NUM_SEG):
            da = rstd[:, None] * (dy[s] * w[s][None, :] - mean_dxhat[:, None] - xhat[s] * mean_dxhat_xhat[:, None])
            dz = dz + (da * slopes[s],)
            new_dw = new_dw + (dw[s] + dy[s] * xhat[s],)
            new_db = new_db + (db[s] + dy[s],)
        dw = new_dw
        db = new_db
        _store_rows(z_ptr, dz, rows, cols, row_ok, width, SEG, NUM_SEG, EVEN_W)
    for s in tl.static_range(NUM_SEG):
        at = s * SEG + cols
        tl.store(dw_partial_ptr + pid * width + at, tl.sum(dw[s], axis=0), mask=at < width)
        tl.store(db_partial_ptr + pid * width + at, tl.sum(db[s], axis=0), mask=at < width)


def pick_config(kernel: str, dim: int, features: int, kind: str) -> KernelConfig:
    """The pinned config of an expert kernel ("stats", "mix", "grad_stats", "weight_grad", "query_grad") for
    D = dim, M = features and dots on `kind` (`kernels._common.dot_operands`); the per-sample GEMM passes get
    BLOCK_M = _BLOCK_M."""
    config = PINNED_CONFIGS.get((kernel, dim, features, kind), DEFAULT_CONFIGS[kernel][kind])
    return config if kernel in FLAT_KERNELS else config.with_tiles(BLOCK_M=_BLOCK_M)


def even_columns(columns: int, config: KernelConfig) -> bool:
    """EVEN_M of an expert launch over `columns` features: no column tile is ragged, so no column masks."""
    return columns % config["BLOCK_M"] == 0


def column_slices(row_blocks: int, tiles: int, config: KernelConfig, sm_count: int | None) -> tuple[int, int]:
    """(slices, column tiles per slice) of a pass whose programs each hold one block of rows and walk a slice
    of the `tiles` column tiles: enough slices for row blocks x slices to fill the SMs once with the programs
    each holds (the interpreter: 4 SMs), and no more, so that each program reloads its rows as rarely as
    the GPU's width allows."""
    programs = (sm_count or 4) * resident_programs(config.num_warps)
    span = triton.cdiv(tiles, max(1, min(tiles, programs // row_blocks)))
    return triton.cdiv(tiles, span), span


def query_grad_slices(rows: int, features: int, config: KernelConfig, sm_count: int | None) -> tuple[int, int]:
    """(slices, columns per slice) of the query-gradient pass: its [rows, D] output has only rows / BLOCK_R
    row blocks (12 at B = 256), so the column range is cut into slices (`column_slices`), each slice's product
    kept and summed after."""
    slices, span = column_slices(triton.cdiv(rows, config["BLOCK_R"]), triton.cdiv(features, config["BLOCK_M"]),
                                 config, sm_count)
    return slices, span * config["BLOCK_M"]


# GELU + LayerNorm row kernels: blocks of ROW_BLOCK rows, one row per warp up to D_o = 768 (24 values per
# thread); wider rows take two warps each (D_o = 1024 on one warp holds 32 values per thread and its backward
# reaches 255 registers, 8 warps per SM; on two, 128 registers and 16 warps per SM).
ROW_BLOCK = 4
ROW_STAGES = 1
ONE_WARP_ROWS = 768  # widest row given one warp


def row_layout(width: int) -> dict:
    """SEG, NUM_SEG, EVEN_W of the row kernels for rows of `width`: three segments of width / 3 when that is a
    power of two (D_o = 768: 3 x 256), else one power-of-two segment (masked past width unless it fits)."""
    block = triton.next_power_of_2(width)
    if width != block and width % (block // 4) == 0:
        return dict(SEG=block // 4, NUM_SEG=width // (block // 4), EVEN_W=True)
    return dict(SEG=block, NUM_SEG=1, EVEN_W=width == block)


# The backward row kernel holds 128 to 255 registers per thread (sm_90, Triton 3.6 and 3.8; 168 at D_o = 768
# on one warp per row, up to 176 at D_o = 1024 on two): an SM holds 12 of its warps at the most (three 4-warp
# programs, one 8-warp one), and a grid of more programs per SM would run a second, partial wave.
ROW_BWD_WARPS_PER_SM = 12


def row_bwd_programs_per_sm(width: int) -> int:
    """Programs of the backward row kernel an SM holds at once, for rows of `width`."""
    return max(1, ROW_BWD_WARPS_PER_SM // row_config(width).num_warps)


def row_programs(rows: int, width: int, sm_count: int | None) -> tuple[int, int]:
    """(programs, row blocks per program) of the GELU + LayerNorm backward row kernel for rows of `width`: as
    many programs as the SMs hold at once (the interpreter: 4), each walking its share of the row blocks."""
    blocks = triton.cdiv(rows, ROW_BLOCK)
    programs = max(1, min(blocks, row_bwd_programs_per_sm(width) * sm_count if sm_count else 4))
    per_program = triton.cdiv(blocks, programs)
    return triton.cdiv(blocks, per_program), per_program


_F32 = torch.float32


@functools.lru_cache(maxsize=64)  # planned once per shape: the op asks at every call, forward and backward
def expert_plan(batch: int, patterns: int, dim: int, out_dim: int, dtype: torch.dtype, scores_dtype: torch.dtype,
                mix_divisor: float, loss_weight: float, eps: float, sm_count: int | None
                ) -> dict[str, list[PlannedLaunch]]:
    """The expert passes' launches for queries [batch, patterns, dim] in `dtype`, scores [batch, patterns] in
    `scores_dtype` and D_o = out_dim, on a GPU with `sm_count` SMs (None: the interpreter): "forward" (stats,
    stats_merge, mix) and "backward" (grad_stats, grad_constants, weight_grad, query_grad). Parameters are
    float32, as training holds them (the op reads the small vectors in whatever float dtype they have)."""
    features = dim * out_dim
    kind = dot_operands(dtype)
    n_tiles = triton.cdiv(features, _BLOCK_M)
    operands = dict(q_ptr=dtype, w_ptr=dtype, bias_ptr=_F32)
    constants = dict(B=batch, M=features, P=patterns, D=dim, DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED)

    def held(kernel, name, tensors, scalars=None):
        config = pick_config(name, dim, features, kind)
        row_blocks = triton.cdiv(batch, config["BLOCK_B"])
        slices, span = column_slices(row_blocks, n_tiles, config, sm_count)
        return PlannedLaunch(kernel, (row_blocks, slices), config, operands | tensors,
                             constants | dict(n_tiles=n_tiles, span=span, K_TILES=triton.cdiv(dim, config["BLOCK_K"]),
                                              EVEN_M=even_columns(features, config)) | (scalars or {}),
                             part=f"{slices} slices of {span} tiles")

    def per_sample(kernel, tensors, scalars):
        return PlannedLaunch(kernel, (batch,), _PER_SAMPLE_CONFIG, dict(scores_ptr=scores_dtype) | tensors,
                             dict(M=features, n_tiles=n_tiles, mix_divisor=mix_divisor, P=patterns) | scalars)

    def flat(kernel, name, grid, tensors, scalars, part):
        config = pick_config(name, dim, features, kind)
        return PlannedLaunch(kernel, grid(config), config, operands | tensors | du_inputs,
                             constants | dict(K_TILES=triton.cdiv(dim, config["BLOCK_K"]),
                                              EVEN_M=even_columns(features, config)) | scalars, part=part)

    forward = [held(_expert_stats_kernel, "stats", dict(tile_mean_ptr=_F32, tile_m2_ptr=_F32)),
               per_sample(_expert_stats_merge_kernel,
                          dict(tile_mean_ptr=_F32, tile_m2_ptr=_F32, mean_ptr=_F32, rstd_ptr=_F32, alpha_ptr=_F32,
                               offset_ptr=_F32, c_sum_ptr=_F32), dict(eps=eps, TILE_COLUMNS=_BLOCK_M)),
               held(_expert_mix_kernel, "mix", dict(alpha_ptr=_F32, offset_ptr=_F32, c_sum_ptr=_F32, gamma_ptr=_F32,
                                                      beta_ptr=_F32, mixed_ptr=dtype, normalized_ptr=dtype,
                                                      sq_partial_ptr=_F32),
                     dict(loss_scale=loss_weight / batch))]
    loss_scale = 2.0 * loss_weight / batch  # of dW's experts-loss term, per unit of dloss
    row_constants = dict(row_shift_ptr=_F32, alpha_ptr=_F32, du_const_ptr=_F32, du_slope_ptr=_F32)
    du_inputs = dict(scaled_grad_ptr=dtype) | row_constants
    rows = batch * patterns
    slices, span = query_grad_slices(rows, features, pick_config("query_grad", dim, features, kind), sm_count)
    backward = [held(_expert_grad_stats_kernel, "grad_stats",
                      dict(gamma_ptr=_F32, beta_ptr=_F32, grad_ptr=dtype, normalized_ptr=dtype,
                           grad_loss_ptr=_F32, scores_ptr=scores_dtype, scaled_grad_ptr=dtype, partial_ptr=_F32,
                           column_partial_ptr=_F32),
                      dict(loss_scale=loss_scale, mix_divisor=mix_divisor)),
                per_sample(_expert_grad_constants_kernel,
                           dict(partial_ptr=_F32, mean_ptr=_F32, rstd_ptr=_F32, grad_scores_ptr=scores_dtype)
                           | row_constants, {}),
                flat(_expert_weight_grad_kernel, "weight_grad", lambda c: (triton.cdiv(features, c["BLOCK_M"]),),
                     dict(d_weight_ptr=_F32), {}, ""),
                flat(_expert_query_grad_kernel, "query_grad", lambda c: (triton.cdiv(rows, c["BLOCK_R"]), slices),
                     dict(dq_partial_ptr=_F32, bias_partial_ptr=_F32), dict(span=span),
                     f"{slices} slices of {span} columns")]
    return dict(forward=forward, backward=backward)


@functools.lru_cache(maxsize=64)
def row_plan(rows: int, width: int, dtype: torch.dtype, eps: float, sm_count: int | None) -> dict[str, PlannedLaunch]:
    """The GELU + LayerNorm row kernels' launches ("forward", "backward") for `rows` rows of `width` in `dtype`,
    on a GPU with `sm_count` SMs (None: the interpreter); LayerNorm parameters float32."""
    config = row_config(width)
    scalars = dict(n_rows=rows, width=width, eps=eps, INTERPRETED=INTERPRETED) | row_layout(width)
    programs, blocks_per_program = row_programs(rows, width, sm_count)
    return dict(
        forward=PlannedLaunch(_gelu_layer_norm_fwd_kernel, (triton.cdiv(rows, ROW_BLOCK),), config,
                              dict(z_ptr=dtype, y_ptr=dtype, w_ptr=_F32, b_ptr=_F32), scalars),
        backward=PlannedLaunch(_gelu_layer_norm_bwd_kernel, (programs,), config,
                               dict(z_ptr=dtype, dy_ptr=dtype, w_ptr=_F32, dw_partial_ptr=_F32, db_partial_ptr=_F32),
                               scalars | dict(blocks_per_program=blocks_per_program),
                               part=f"{programs} programs x {blocks_per_program} row blocks"))


def _compute_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What `expert_mix` returns as its rounded weight: the weight in the compute dtype when it has another
    dtype (float32 under autocast), else nothing (an empty tensor: the op cannot return an alias of its input)."""
    return weight.new_empty((0,) if weight.dtype == dtype else weight.shape, dtype=dtype)


@torch.library.custom_op(f"{NAMESPACE}::expert_mix", mutates_args=())
def expert_mix(queries: torch.Tensor, scores: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               norm_weight: torch.Tensor, norm_bias: torch.Tensor, mix_divisor: float, loss_weight: float,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor]:
    """(queries, scores, expert Linear, LN_E) -> (W_b [B, D*D_o], experts_loss, mean [B, P], rstd [B, P],
    rounded weight, sum_e c_e xhat_e [B, D*D_o]); see the module docstring. The last four are what backward
    needs beyond the inputs."""
    check_capability(OP, queries.device)
    # A float32 expert weight (the parameter, under autocast) is rounded to the compute dtype once here and
    # the copy is kept for backward: one cast per call instead of one per pass. (Rounding tile by tile inside
    # the kernels instead doubles the W tile's registers.)
    rounded = _compute_weight(weight, queries.dtype)
    weight_compute = weight if weight.dtype == queries.dtype else rounded.copy_(weight)
    batch, patterns, dim = queries.shape
    features = weight.shape[0]
    n_tiles = triton.cdiv(features, _BLOCK_M)
    f32 = dict(device=queries.device, dtype=torch.float32)
    stats_launch, merge_launch, mix_launch = expert_plan(batch, patterns, dim, features // dim, queries.dtype,
                                                         scores.dtype, mix_divisor, loss_weight, eps,
                                                         multiprocessors(queries.device))["forward"]

    tile_mean = torch.empty(batch, patterns, n_tiles, **f32)
    tile_m2 = torch.empty(batch, patterns, n_tiles, **f32)
    stats_launch(q_ptr=queries, w_ptr=weight_compute, bias_ptr=bias, tile_mean_ptr=tile_mean, tile_m2_ptr=tile_m2)
    mean, rstd, alpha = (torch.empty(batch, patterns, **f32) for _ in range(3))
    offset, c_sum = torch.empty(batch, **f32), torch.empty(batch, **f32)
    merge_launch(tile_mean_ptr=tile_mean, tile_m2_ptr=tile_m2, scores_ptr=scores, mean_ptr=mean, rstd_ptr=rstd,
                 alpha_ptr=alpha, offset_ptr=offset, c_sum_ptr=c_sum)
    mixed = torch.empty(batch, features, device=queries.device, dtype=queries.dtype)
    normalized = torch.empty_like(mixed)
    sq_partial = torch.empty(batch, n_tiles, **f32)
    mix_launch(q_ptr=queries, w_ptr=weight_compute, bias_ptr=bias, alpha_ptr=alpha, offset_ptr=offset,
               c_sum_ptr=c_sum, gamma_ptr=norm_weight, beta_ptr=norm_bias, mixed_ptr=mixed, normalized_ptr=normalized,
               sq_partial_ptr=sq_partial)
    experts_loss = sq_partial.sum()  # float32, whatever the compute dtype: the partials carry weight / B
    return mixed, experts_loss, mean, rstd, rounded, normalized


@expert_mix.register_fake
def _(queries, scores, weight, bias, norm_weight, norm_bias, mix_divisor, loss_weight, eps):
    batch, patterns, _ = queries.shape
    stats = queries.new_empty(batch, patterns, dtype=torch.float32)
    mixed = queries.new_empty(batch, weight.shape[0])
    return (mixed, queries.new_empty((), dtype=torch.float32), stats, torch.empty_like(stats),
            _compute_weight(weight, queries.dtype), torch.empty_like(mixed))


@torch.library.custom_op(f"{NAMESPACE}::expert_mix_backward", mutates_args=())
def expert_mix_backward(grad_mixed: torch.Tensor, grad_loss: torch.Tensor, queries: torch.Tensor,
                        scores: torch.Tensor, weight_compute: torch.Tensor, bias: torch.Tensor,
                        norm_weight: torch.Tensor, norm_bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        normalized: torch.Tensor, mix_divisor: float, loss_weight: float,
                        eps: float, weight_dtype: torch.dtype,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `expert_mix`'s (W_b, experts_loss) with respect to its six tensor inputs, LN_E's two as one
    float32 [2, M] tensor (gamma's, beta's: one sum makes both)."""
    batch, patterns, dim = queries.shape
    features = weight_compute.shape[0]
    n_tiles = triton.cdiv(features, _BLOCK_M)
    f32 = dict(device=queries.device, dtype=torch.float32)
    grad_mixed = grad_mixed.contiguous()
    grad_stats_launch, constants_launch, weight_grad_launch, query_grad_launch = expert_plan(
        batch, patterns, dim, features // dim, queries.dtype, scores.dtype, mix_divisor, loss_weight, eps,
        multiprocessors(queries.device))["backward"]

    partial = torch.empty(batch, patterns + 2, n_tiles, **f32)
    scaled_grad = torch.empty_like(normalized)  # dW gamma in the compute dtype: what the du passes read of dW
    column_partial = torch.empty(2, grad_stats_launch.grid[0], features, **f32)
    grad_stats_launch(q_ptr=queries, w_ptr=weight_compute, bias_ptr=bias, gamma_ptr=norm_weight,
                      beta_ptr=norm_bias, grad_ptr=grad_mixed, normalized_ptr=normalized,
                      grad_loss_ptr=grad_loss, scores_ptr=scores, scaled_grad_ptr=scaled_grad, partial_ptr=partial,
                      column_partial_ptr=column_partial)
    grad_scores = torch.empty_like(scores)
    row_constants = dict(row_shift_ptr=torch.empty(batch, **f32), alpha_ptr=torch.empty(batch, patterns, **f32),
                         du_const_ptr=torch.empty(batch, patterns, **f32),
                         du_slope_ptr=torch.empty(batch, patterns, **f32))
    constants_launch(partial_ptr=partial, scores_ptr=scores, mean_ptr=mean, rstd_ptr=rstd,
                     grad_scores_ptr=grad_scores, **row_constants)

    du_inputs = dict(q_ptr=queries, w_ptr=weight_compute, bias_ptr=bias, scaled_grad_ptr=scaled_grad,
                     **row_constants)
    grad_weight = torch.empty(features, dim, device=queries.device, dtype=weight_dtype)
    weight_grad_launch(**du_inputs, d_weight_ptr=grad_weight)
    row_blocks, slices = query_grad_launch.grid
    dq_partial = torch.empty(slices, batch * patterns, dim, **f32)
    bias_partial = torch.empty(row_blocks, features, **f32)
    query_grad_launch(**du_inputs, dq_partial_ptr=dq_partial, bias_partial_ptr=bias_partial)
    return (dq_partial.sum(0).view_as(queries).to(queries.dtype), grad_scores, grad_weight,
            bias_partial.sum(0).to(bias.dtype), column_partial.sum(1))


@expert_mix_backward.register_fake
def _(grad_mixed, grad_loss, queries, scores, weight_compute, bias, norm_weight, norm_bias, mean, rstd, normalized,
      mix_divisor, loss_weight, eps, weight_dtype):
    return (torch.empty_like(queries), torch.empty_like(scores), torch.empty_like(weight_compute, dtype=weight_dtype),
            torch.empty_like(bias), norm_weight.new_empty(2, norm_weight.shape[0], dtype=torch.float32))


def _expert_mix_setup(ctx, inputs, output):
    queries, scores, weight, bias, norm_weight, norm_bias, mix_divisor, loss_weight, eps = inputs
    _, _, mean, rstd, rounded, normalized = output
    ctx.save_for_backward(queries, scores, weight if weight.dtype == queries.dtype else rounded, bias, norm_weight,
                          norm_bias, mean, rstd, normalized)
    ctx.mix_divisor, ctx.loss_weight, ctx.eps, ctx.weight_dtype = mix_divisor, loss_weight, eps, weight.dtype
    ctx.set_materialize_grads(False)  # no zero gradients made for the statistics (nothing differentiates them)


def _expert_mix_grad(ctx, grad_mixed, grad_loss, *_):
    queries, _, _, _, norm_weight, norm_bias, _, _, normalized = ctx.saved_tensors
    grad_mixed = torch.zeros_like(normalized) if grad_mixed is None else grad_mixed
    grad_loss = queries.new_zeros((), dtype=torch.float32) if grad_loss is None else grad_loss
    *grads, grad_norm = expert_mix_backward(grad_mixed, grad_loss, *ctx.saved_tensors, ctx.mix_divisor,
                                            ctx.loss_weight, ctx.eps, ctx.weight_dtype)
    return (*grads, grad_norm[0].to(norm_weight.dtype), grad_norm[1].to(norm_bias.dtype), None, None, None)


expert_mix.register_autograd(_expert_mix_grad, setup_context=_expert_mix_setup)


# The output stage: y = LayerNorm(GELU(h @ W_b)) with h [B, L, D], W_b [B, D, D_o]. Backward needs z = h @ W_b
# again, and turns it into dz in place. Recomputing it (one batched GEMM) reads h and W_b; keeping it costs
# [B, L, D_o] of memory until backward. So z is kept only where it is small beside W_b, which the op keeps
# anyway (`keeps_output`: at most a sixteenth of it, as in the stacked CLS call, L = 1, where recomputing
# would read all of W_b for [B, 1, D_o]); elsewhere it is recomputed, and the output stage adds no activation
# memory of its own.
KEPT_OUTPUT_SHARE = 16


def keeps_output(tokens: int, dim: int) -> bool:
    """Whether the output stage keeps z [B, tokens, D_o] for backward rather than recomputing it from h [B,
    tokens, dim] and W_b [B, dim, D_o]: when z is at most 1 / KEPT_OUTPUT_SHARE of W_b."""
    return tokens * KEPT_OUTPUT_SHARE <= dim


@torch.library.custom_op(f"{NAMESPACE}::output_projection", mutates_args=())
def output_projection(h: torch.Tensor, mixed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z): y = LN_o(GELU(z)) * weight + bias with z = h @ W_b, which backward keeps where `keeps_output`."""
    check_capability(OP, h.device)
    z = torch.bmm(h, mixed)
    rows, width = z.numel() // z.shape[-1], z.shape[-1]
    y = torch.empty_like(z)
    row_plan(rows, width, z.dtype, eps, multiprocessors(z.device))["forward"](z_ptr=z, y_ptr=y, w_ptr=weight,
                                                                             b_ptr=bias)
    return y, z


@output_projection.register_fake
def _(h, mixed, weight, bias, eps):
    y = h.new_empty(h.shape[0], h.shape[1], mixed.shape[2])
    return y, torch.empty_like(y)


@torch.library.custom_op(f"{NAMESPACE}::output_projection_backward", mutates_args=())
def output_projection_backward(grad_y: torch.Tensor, h: torch.Tensor, mixed: torch.Tensor, weight: torch.Tensor,
                               kept: torch.Tensor | None, eps: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d h, d W_b, [d weight, d bias] as one float32 [2, D_o] tensor) of `output_projection`; `kept`: z as
    forward made it, or None to recompute it."""
    dz = torch.bmm(h, mixed) if kept is None else kept.clone()  # the row kernel overwrites it with dz
    rows, width = dz.numel() // dz.shape[-1], dz.shape[-1]
    backward = row_plan(rows, width, dz.dtype, eps, multiprocessors(dz.device))["backward"]
    partial = torch.empty(2, backward.grid[0], width, device=dz.device, dtype=torch.float32)  # dw, db: one sum
    backward(z_ptr=dz, dy_ptr=grad_y.contiguous(), w_ptr=weight, dw_partial_ptr=partial[0], db_partial_ptr=partial[1])
    grad_h = torch.bmm(dz, mixed.transpose(1, 2))
    grad_mixed = torch.bmm(h.transpose(1, 2), dz)
    return grad_h, grad_mixed, partial.sum(1)


@output_projection_backward.register_fake
def _(grad_y, h, mixed, weight, kept, eps):
    return torch.empty_like(h), torch.empty_like(mixed), weight.new_empty(2, weight.shape[0], dtype=torch.float32)


def _output_projection_setup(ctx, inputs, output):
    h, mixed, weight, _, eps = inputs
    ctx.save_for_backward(h, mixed, weight, output[1] if keeps_output(h.shape[1], h.shape[2]) else None)
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # z is returned for backward's sake; nothing differentiates it


def _output_projection_grad(ctx, grad_y, _):
    grad_h, grad_mixed, grad_norm = output_projection_backward(grad_y, *ctx.saved_tensors, ctx.eps)
    weight = ctx.saved_tensors[2]
    return grad_h, grad_mixed, grad_norm[0].to(weight.dtype), grad_norm[1].to(weight.dtype), None


output_projection.register_autograd(_output_projection_grad, setup_context=_output_projection_setup)


def row_config(width: int) -> KernelConfig:
    """The row kernels' launch config for rows of `width` (the segments come from `row_layout`)."""
    return KernelConfig.of(ROW_BLOCK * (1 if width <= ONE_WARP_ROWS else 2), ROW_STAGES, BLOCK_R=ROW_BLOCK)


def _check_inputs(queries, scores, h, expert_weight, expert_bias, expert_norm_weight, expert_norm_bias,
                  out_norm_weight, out_norm_bias) -> None:
    check_device(OP, queries=queries, scores=scores, h=h, expert_weight=expert_weight, expert_bias=expert_bias,
                 expert_norm_weight=expert_norm_weight, expert_norm_bias=expert_norm_bias,
                 out_norm_weight=out_norm_weight, out_norm_bias=out_norm_bias)
    if queries.dim() != 3 or h.dim() != 3:
        raise ValueError(f"{OP}: queries must be [B,P,D] and h [B,L,D]; got {tuple(queries.shape)} "
                         f"and {tuple(h.shape)}")
    batch, patterns, dim = queries.shape
    out_dim = out_norm_weight.shape[0] if out_norm_weight.dim() == 1 else -1
    if out_dim <= 0:
        raise ValueError(f"{OP}: out_norm_weight must be [D_o]; got {tuple(out_norm_weight.shape)}")
    if batch == 0 or h.shape[1] == 0:
        raise ValueError(f"{OP}: empty batch or token axis (queries {tuple(queries.shape)}, h {tuple(h.shape)})")
    check_shape(OP, "scores", scores, (batch, patterns))
    check_shape(OP, "h", h, (batch, h.shape[1], dim))
    check_shape(OP, "expert_weight", expert_weight, (dim * out_dim, dim))
    for name, t, n in (("expert_bias", expert_bias, dim * out_dim), ("expert_norm_weight", expert_norm_weight,
                       dim * out_dim), ("expert_norm_bias", expert_norm_bias, dim * out_dim),
                       ("out_norm_bias", out_norm_bias, out_dim)):
        check_shape(OP, name, t, (n,))
    for name, t in (("queries", queries), ("scores", scores), ("h", h), ("expert_weight", expert_weight),
                    ("expert_bias", expert_bias), ("expert_norm_weight", expert_norm_weight),
                    ("expert_norm_bias", expert_norm_bias), ("out_norm_weight", out_norm_weight),
                    ("out_norm_bias", out_norm_bias)):
        check_dtype(OP, name, t)
    if queries.dtype != h.dtype or expert_weight.dtype not in (queries.dtype, torch.float32):
        raise TypeError(f"{OP}: queries and h must share one dtype, and expert_weight must have it too or be "
                        f"float32 (cast, or run under autocast); got queries={str(queries.dtype)[6:]}, "
                        f"h={str(h.dtype)[6:]}, expert_weight={str(expert_weight.dtype)[6:]}")


def expert_path(queries: torch.Tensor, scores: torch.Tensor, h: torch.Tensor,
                expert_weight: torch.Tensor, expert_bias: torch.Tensor,
                expert_norm_weight: torch.Tensor, expert_norm_bias: torch.Tensor,
                out_norm_weight: torch.Tensor, out_norm_bias: torch.Tensor, *,
                mix_divisor: float = 256.0, experts_loss_weight: float = 0.025,
                eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `dpal.decoder.expert_path_reference` (same arguments, same results up to rounding).

    The compute dtype is that of queries and h; under CUDA autocast both are cast to the autocast dtype, as
    the reference's matmuls would be. expert_weight may stay float32 (rounded to the compute dtype inside
    the op); the small vectors are read in whatever float dtype they have.
    """
    if queries.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        queries, h = queries.to(dtype), h.to(dtype)
    _check_inputs(queries, scores, h, expert_weight, expert_bias, expert_norm_weight, expert_norm_bias,
                  out_norm_weight, out_norm_bias)
    batch, _, dim = queries.shape
    out_dim = out_norm_weight.shape[0]
    with torch.autocast(queries.device.type, enabled=False):
        mixed, experts_loss, *_ = expert_mix(
            queries.contiguous(), scores.contiguous(), expert_weight.contiguous(), expert_bias.contiguous(),
            expert_norm_weight.contiguous(), expert_norm_bias.contiguous(), float(mix_divisor),
            float(experts_loss_weight), float(eps))
        y, _ = output_projection(h.contiguous(), mixed.view(batch, dim, out_dim), out_norm_weight.contiguous(),
                                 out_norm_bias.contiguous(), float(eps))
    return y, experts_loss
