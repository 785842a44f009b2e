"""Fused decoder expert path: matches `dpal.decoder.expert_path_reference` without [B, P, D, D_o] tensors.

Math (c_e = s_e / mix_divisor, M = D * D_o, u = q_e W^T + b, g = GELU(u), per (b, e) mean mu_e and
reciprocal std r_e of g over all M values, xhat = (g - mu_e) r_e):

    W_b[m]   = gamma[m] * sum_e c_e xhat_e[m] + beta[m] * sum_e c_e
    loss     = weight * mean_b sum_m W_b[m]^2
    y        = LN_o(GELU(h @ W_b))

Forward: two passes of one GEMM-shaped kernel over tiles (samples x M), each recomputing u from q and W
in registers: pass 1 writes per-tile variance partials (mean, M2; merged with Chan's formula), pass 2
writes W_b [B, M] and per-tile sums of W_b^2. Nothing of size [B, P, M] is written, and none is saved:
backward keeps q, s, the parameters, (mu, r) [B, P] and W_b.

Backward, with dW = dL/dW_b + 2 weight / B * dloss * W_b:
    A_e = sum_m dW gamma xhat_e,  Bs = sum_m dW gamma,  C = sum_m dW beta   (pass 1, recomputes u)
    ds_e = (A_e + C) / mix_divisor
    du_e = GELU'(u) * r_e c_e (dW gamma - Bs / M - xhat_e A_e / M)          (pass 2, recomputes u)
    dgamma = sum_b dW sum_e c_e xhat_e,  dbeta = sum_b dW sum_e c_e,  dbias = sum_{b,e} du_e
                                                                       (pass 2 column sums)
du exists only one column chunk at a time (at most `_DU_CHUNK_ELEMENTS` values) and is consumed by two
cuBLAS GEMMs (dq += du W_chunk, dW_expert[chunk] = du^T q) before the next chunk is made.

The output stage is a batched cuBLAS GEMM z = h @ W_b and a fused GELU + LayerNorm row kernel; backward
recomputes z (one GEMM) rather than keeping [B, L, D_o] alive, and overwrites it with dz in place.

Memory kept from forward to backward: W_b [B, D*D_o] and [B, P] statistics, beyond the inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (INTERPRETED, KernelConfig, check_device, check_dtype, check_shape, dot_operands,
                             dot_precision, launch, mma, multiprocessors, num_programs_for_rows)

OP = "fused expert path"

# Expert GEMM passes: rows are samples (one tl.dot per pattern query), columns the D * D_o output
# features in tiles of _BLOCK_M (fixed: per-tile partial statistics are indexed by it), K the query width.
# Configs are pinned per (kernel, D, M, dot operands) from the sm_90 compile facts (`make check-sm90`;
# README "Kernel configurations on sm_90"), never tuned at run time: the same shapes run the same code
# (and summation order) on every rank and resume. Rule for shapes off the table: the default of the
# operand kind. Tensor-core tiles keep 64 rows (one wgmma M per warpgroup) and 8 warps: with 4 warps,
# 128 rows or (TF32) K steps of 64 the mix pass and the du pass spill (see the README).
_BLOCK_M = 128
_BF16_PASS = KernelConfig.of(8, 3, BLOCK_B=64, BLOCK_K=64)
DEFAULT_CONFIGS = {
    "stats": {"bf16": _BF16_PASS, "fp16": _BF16_PASS, "tf32": KernelConfig.of(8, 3, BLOCK_B=64, BLOCK_K=32),
              "fp32": KernelConfig.of(8, 3, BLOCK_B=32, BLOCK_K=32)},
    "grad": {"bf16": KernelConfig.of(8, 3, BLOCK_B=64, BLOCK_K=64, BLOCK_M=64),
             "fp16": KernelConfig.of(8, 3, BLOCK_B=64, BLOCK_K=64, BLOCK_M=64),
             "tf32": KernelConfig.of(8, 3, BLOCK_B=64, BLOCK_K=32, BLOCK_M=64),
             "fp32": KernelConfig.of(8, 3, BLOCK_B=64, BLOCK_K=64, BLOCK_M=64)}}
DEFAULT_CONFIGS["mix"] = DEFAULT_CONFIGS["grad_stats"] = DEFAULT_CONFIGS["stats"]  # same GEMM, similar epilogues
# The recipes' (D, D_o): ViT-Ti, ViT-B and the Swin students (192) or ViT-S (384), PATH-B (768) or
# PATH-L / SOLIDER-B (1024) teachers. Every recipe shape has its operand kind's default today.
PINNED_CONFIGS = {(kernel, dim, dim * out_dim, kind): config
                  for kernel, by_kind in DEFAULT_CONFIGS.items() for kind, config in by_kind.items()
                  for dim, out_dim in ((192, 768), (192, 1024), (384, 768))}
# Largest transient du chunk in backward (values): 2^24 bf16 = 32 MiB, a small fraction of what eager
# keeps, while chunks stay wide enough (>= thousands of columns) for the cuBLAS GEMMs that consume them.
_DU_CHUNK_ELEMENTS = 1 << 24


@triton.jit
def _gelu(u):
    return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))


@triton.jit
def _gelu_grad(u):
    return 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)) + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)


@triton.jit
def _expert_preactivation(q_ptr, w_ptr, bias_ptr, offs_b, e, offs_m, B, P: tl.constexpr, D, M,
                          BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """u = q[b, e] . W[m] + bias[m] for a tile of samples x output features, fp32."""
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    q_rows = (offs_b.to(tl.int64) * P + e) * D
    w_rows = offs_m.to(tl.int64) * D
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(q_ptr + q_rows[:, None] + offs_k[None, :],
                    mask=(offs_b[:, None] < B) & (offs_k[None, :] < D), other=0.0)
        w = tl.load(w_ptr + w_rows[None, :] + offs_k[:, None],
                    mask=(offs_k[:, None] < D) & (offs_m[None, :] < M), other=0.0)
        acc = mma(q, w, acc, DOT_PRECISION, UPCAST_DOT)
    bias = tl.load(bias_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _expert_row_value(ptr, offs_b, e, P: tl.constexpr, row_ok):
    """One fp32 value per sample of a [B, P] per-expert buffer (LN statistics, gate scores), for expert e."""
    return tl.load(ptr + offs_b * P + e, mask=row_ok, other=0.0).to(tl.float32)


@triton.jit
def _expert_stats_kernel(q_ptr, w_ptr, bias_ptr, tile_mean_ptr, tile_m2_ptr, B, D, M, n_tiles,
                         P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Per (b, e, column tile): mean and sum of squared deviations of GELU(u) over the tile's columns."""
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = (offs_m < M)[None, :]
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    row_ok = offs_b < B
    for e in tl.static_range(P):
        u = _expert_preactivation(q_ptr, w_ptr, bias_ptr, offs_b, e, offs_m, B, P, D, M,
                                  BLOCK_B, BLOCK_M, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
        g = tl.where(col_ok, _gelu(u), 0.0)
        tile_mean = tl.sum(g, axis=1) / count
        dev = tl.where(col_ok, g - tile_mean[:, None], 0.0)
        out = (offs_b * P + e) * n_tiles + pid_m
        tl.store(tile_mean_ptr + out, tile_mean, mask=row_ok)
        tl.store(tile_m2_ptr + out, tl.sum(dev * dev, axis=1), mask=row_ok)


@triton.jit
def _expert_mix_kernel(q_ptr, w_ptr, bias_ptr, scores_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                       mixed_ptr, sq_partial_ptr, inv_mix, B, D, M, n_tiles,
                       P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """W_b tile = gamma * sum_e c_e xhat_e + beta * sum_e c_e, plus per-tile row sums of W_b^2."""
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_b < B
    col_ok = offs_m < M
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    c_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for e in tl.static_range(P):
        u = _expert_preactivation(q_ptr, w_ptr, bias_ptr, offs_b, e, offs_m, B, P, D, M,
                                  BLOCK_B, BLOCK_M, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
        mu = _expert_row_value(mean_ptr, offs_b, e, P, row_ok)
        r = _expert_row_value(rstd_ptr, offs_b, e, P, row_ok)
        c = _expert_row_value(scores_ptr, offs_b, e, P, row_ok) * inv_mix
        acc += (c * r)[:, None] * (_gelu(u) - mu[:, None])
        c_sum += c
    gamma = tl.load(gamma_ptr + offs_m, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_m, mask=col_ok, other=0.0).to(tl.float32)
    mixed = (acc * gamma[None, :] + c_sum[:, None] * beta[None, :]).to(mixed_ptr.dtype.element_ty)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(mixed_ptr + offs_b.to(tl.int64)[:, None] * M + offs_m[None, :], mixed, mask=ok)
    # The loss is taken of the stored (rounded) W_b, the same values backward differentiates through.
    stored = tl.where(ok, mixed.to(tl.float32), 0.0)
    tl.store(sq_partial_ptr + offs_b * n_tiles + pid_m, tl.sum(stored * stored, axis=1), mask=row_ok)


@triton.jit
def _load_mixed_grad(grad_ptr, mixed_ptr, loss_coef_ptr, offs_b, offs_m, B, M, m_stop):
    """dW = dL/dW_b + (2 weight / B) dloss W_b for a tile of W_b [B, M] (zero outside rows < B, columns < m_stop)."""
    ok = (offs_b < B)[:, None] & (offs_m < m_stop)[None, :]
    at = offs_b.to(tl.int64)[:, None] * M + offs_m[None, :]
    grad = tl.load(grad_ptr + at, mask=ok, other=0.0).to(tl.float32)
    mixed = tl.load(mixed_ptr + at, mask=ok, other=0.0).to(tl.float32)
    return grad + tl.load(loss_coef_ptr) * mixed


@triton.jit
def _expert_grad_stats_kernel(q_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                              grad_ptr, mixed_ptr, loss_coef_ptr, partial_ptr, B, D, M, n_tiles,
                              P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Per (b, column tile): A_e = sum dW gamma xhat_e (slots 0..P-1), sum dW gamma (P), sum dW beta (P+1)."""
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_b < B
    col_ok = offs_m < M
    d_mixed = _load_mixed_grad(grad_ptr, mixed_ptr, loss_coef_ptr, offs_b, offs_m, B, M, M)
    gamma = tl.load(gamma_ptr + offs_m, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_m, mask=col_ok, other=0.0).to(tl.float32)
    d_gamma_scaled = d_mixed * gamma[None, :]
    slot = offs_b * (P + 2) * n_tiles + pid_m
    tl.store(partial_ptr + slot + P * n_tiles, tl.sum(d_gamma_scaled, axis=1), mask=row_ok)
    tl.store(partial_ptr + slot + (P + 1) * n_tiles, tl.sum(d_mixed * beta[None, :], axis=1), mask=row_ok)
    for e in tl.static_range(P):
        u = _expert_preactivation(q_ptr, w_ptr, bias_ptr, offs_b, e, offs_m, B, P, D, M,
                                  BLOCK_B, BLOCK_M, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
        mu = _expert_row_value(mean_ptr, offs_b, e, P, row_ok)
        r = _expert_row_value(rstd_ptr, offs_b, e, P, row_ok)
        xhat = (_gelu(u) - mu[:, None]) * r[:, None]
        tl.store(partial_ptr + slot + e * n_tiles, tl.sum(d_gamma_scaled * xhat, axis=1), mask=row_ok)


@triton.jit
def _expert_grad_kernel(q_ptr, w_ptr, bias_ptr, scores_ptr, mean_ptr, rstd_ptr, gamma_ptr,
                        grad_ptr, mixed_ptr, loss_coef_ptr, a_mean_ptr, b_mean_ptr,
                        du_ptr, d_gamma_partial_ptr, d_beta_partial_ptr, d_bias_partial_ptr,
                        inv_mix, B, D, M, m_start, m_stop, du_row_stride,
                        P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """du for columns [m_start, m_stop) into a chunk buffer (rows b*P+e, column m - m_start), and per
    row block partial column sums for dgamma, dbeta and the expert bias gradient."""
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = m_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_b < B
    col_ok = offs_m < m_stop
    d_mixed = _load_mixed_grad(grad_ptr, mixed_ptr, loss_coef_ptr, offs_b, offs_m, B, M, m_stop)
    gamma = tl.load(gamma_ptr + offs_m, mask=col_ok, other=0.0).to(tl.float32)
    b_mean = tl.load(b_mean_ptr + offs_b, mask=row_ok, other=0.0)
    # Column sums accumulate as [BLOCK_M] vectors, not tiles: fewer live registers per program.
    d_gamma = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_beta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_bias = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ok = row_ok[:, None] & col_ok[None, :]
    for e in tl.static_range(P):
        u = _expert_preactivation(q_ptr, w_ptr, bias_ptr, offs_b, e, offs_m, B, P, D, M,
                                  BLOCK_B, BLOCK_M, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
        mu = _expert_row_value(mean_ptr, offs_b, e, P, row_ok)
        r = _expert_row_value(rstd_ptr, offs_b, e, P, row_ok)
        c = _expert_row_value(scores_ptr, offs_b, e, P, row_ok) * inv_mix
        a_mean = _expert_row_value(a_mean_ptr, offs_b, e, P, row_ok)
        xhat = (_gelu(u) - mu[:, None]) * r[:, None]
        dg = (r * c)[:, None] * (d_mixed * gamma[None, :] - b_mean[:, None] - xhat * a_mean[:, None])
        du = tl.where(ok, dg * _gelu_grad(u), 0.0)
        du_rows = (offs_b.to(tl.int64) * P + e) * du_row_stride
        tl.store(du_ptr + du_rows[:, None] + (offs_m - m_start)[None, :], du.to(du_ptr.dtype.element_ty), mask=ok)
        d_bias += tl.sum(du, axis=0)
        weighted = d_mixed * c[:, None]
        d_gamma += tl.sum(weighted * xhat, axis=0)
        d_beta += tl.sum(weighted, axis=0)
    tl.store(d_gamma_partial_ptr + pid_b * M + offs_m, d_gamma, mask=col_ok)
    tl.store(d_beta_partial_ptr + pid_b * M + offs_m, d_beta, mask=col_ok)
    tl.store(d_bias_partial_ptr + pid_b * M + offs_m, d_bias, mask=col_ok)


@triton.jit
def _gelu_layer_norm_row(z, ok, width, eps):
    """xhat = LN(GELU(z)) of one row before the affine part (fp32, zero outside the row) and its 1/std."""
    a = tl.where(ok, _gelu(z), 0.0)
    mean = tl.sum(a, axis=0) / width
    dev = tl.where(ok, a - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, axis=0) / width + eps)
    return dev * rstd, rstd


@triton.jit
def _gelu_layer_norm_fwd_kernel(z_ptr, y_ptr, w_ptr, b_ptr, width, eps, BLOCK: tl.constexpr):
    """One row: y = LN(GELU(z)) * w + b."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < width
    z = tl.load(z_ptr + row * width + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    xhat, _ = _gelu_layer_norm_row(z, ok, width, eps)
    tl.store(y_ptr + row * width + cols, (xhat * w + b).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gelu_layer_norm_bwd_kernel(z_ptr, dy_ptr, w_ptr, dw_partial_ptr, db_partial_ptr, n_rows, width, eps,
                                rows_per_program, BLOCK: tl.constexpr):
    """Rows [pid * rows_per_program, ...): overwrites z with dz (each row is read before it is written)
    and writes per-program dw/db partials. Row statistics are recomputed from z, nothing is saved."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < width
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
        at = row * width + cols  # < 2^31: B * L * D_o stays far below it at every recipe shape
        z = tl.load(z_ptr + at, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
        xhat, rstd = _gelu_layer_norm_row(z, ok, width, eps)
        dxhat = dy * w
        da = rstd * (dxhat - tl.sum(dxhat, axis=0) / width - xhat * (tl.sum(dxhat * xhat, axis=0) / width))
        tl.store(z_ptr + at, (da * _gelu_grad(z)).to(z_ptr.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    tl.store(dw_partial_ptr + pid * width + cols, dw, mask=ok)
    tl.store(db_partial_ptr + pid * width + cols, db, mask=ok)


def pick_config(kernel: str, dim: int, features: int, kind: str) -> KernelConfig:
    """The pinned config of an expert kernel ("stats", "mix", "grad_stats", "grad") for D = dim, M = features
    and dots on `kind` (`kernels._common.dot_operands`); the passes other than "grad" get BLOCK_M = _BLOCK_M."""
    config = PINNED_CONFIGS.get((kernel, dim, features, kind), DEFAULT_CONFIGS[kernel][kind])
    return config if kernel == "grad" else KernelConfig(config.tiles + (("BLOCK_M", _BLOCK_M),), config.num_warps,
                                                        config.num_stages)


def _expert_grid(batch: int, columns: int, config: KernelConfig) -> tuple[int, int]:
    return triton.cdiv(batch, config["BLOCK_B"]), triton.cdiv(columns, config["BLOCK_M"])


def du_chunk_columns(batch: int, patterns: int, features: int) -> int:
    """Columns of du made per backward chunk: at most _DU_CHUNK_ELEMENTS values, a multiple of _BLOCK_M."""
    return min(features, max(_BLOCK_M, _DU_CHUNK_ELEMENTS // (batch * patterns) // _BLOCK_M * _BLOCK_M))


def row_programs(rows: int, sm_count: int | None) -> tuple[int, int]:
    """(programs, rows per program) of the GELU + LayerNorm backward row kernel."""
    programs = num_programs_for_rows(rows, sm_count)
    rows_per_program = triton.cdiv(rows, programs)
    return triton.cdiv(rows, rows_per_program), rows_per_program


class ExpertMixFunction(torch.autograd.Function):
    """(queries, scores, expert Linear, LN_E) -> (W_b [B, D*D_o], experts_loss); see the module docstring."""

    @staticmethod
    def forward(ctx, queries, scores, weight, bias, norm_weight, norm_bias, mix_divisor, loss_weight, eps):
        # A float32 expert weight (the parameter, under autocast) is rounded to the compute dtype here and
        # again in backward: a transient copy each time, never one kept per decoder call for backward.
        # (Rounding tile by tile inside the kernels instead doubles the W tile's registers; they spill.)
        weight_compute = weight.to(queries.dtype)
        batch, patterns, dim = queries.shape
        features = weight.shape[0]
        n_tiles = triton.cdiv(features, _BLOCK_M)
        f32 = dict(device=queries.device, dtype=torch.float32)
        constants = dict(P=patterns, DOT_PRECISION=dot_precision(queries.dtype), UPCAST_DOT=INTERPRETED)
        kind = dot_operands(queries.dtype)
        stats_config, mix_config = (pick_config(k, dim, features, kind) for k in ("stats", "mix"))

        tile_mean = torch.empty(batch, patterns, n_tiles, **f32)
        tile_m2 = torch.empty(batch, patterns, n_tiles, **f32)
        launch(_expert_stats_kernel, _expert_grid(batch, features, stats_config), stats_config,
               queries, weight_compute, bias, tile_mean, tile_m2, batch, dim, features, n_tiles, **constants)
        # Chan's merge of the per-tile (count, mean, M2) in float64: exact enough for any D*D_o.
        counts = torch.full((n_tiles,), _BLOCK_M, device=queries.device, dtype=torch.float64)
        counts[-1] = features - _BLOCK_M * (n_tiles - 1)
        tile_mean, tile_m2 = tile_mean.double(), tile_m2.double()
        mean = (tile_mean * counts).sum(-1) / features
        m2 = tile_m2.sum(-1) + ((tile_mean - mean[..., None]).square() * counts).sum(-1)
        rstd = torch.rsqrt(m2 / features + eps).float()
        mean = mean.float()

        mixed = torch.empty(batch, features, device=queries.device, dtype=queries.dtype)
        sq_partial = torch.empty(batch, n_tiles, **f32)
        launch(_expert_mix_kernel, _expert_grid(batch, features, mix_config), mix_config,
               queries, weight_compute, bias, scores, mean, rstd, norm_weight, norm_bias, mixed, sq_partial,
               1.0 / mix_divisor, batch, dim, features, n_tiles, **constants)
        experts_loss = loss_weight * sq_partial.sum() / batch

        ctx.save_for_backward(queries, scores, weight, bias, norm_weight, norm_bias, mean, rstd, mixed)
        ctx.mix_divisor, ctx.loss_weight, ctx.constants = mix_divisor, loss_weight, constants
        return mixed, experts_loss  # float32, whatever the compute dtype: it is one number

    @staticmethod
    def backward(ctx, grad_mixed, grad_loss):
        queries, scores, weight, bias, norm_weight, norm_bias, mean, rstd, mixed = ctx.saved_tensors
        constants = ctx.constants
        weight_compute = weight.to(queries.dtype)
        batch, patterns, dim = queries.shape
        features = weight.shape[0]
        n_tiles = triton.cdiv(features, _BLOCK_M)
        f32 = dict(device=queries.device, dtype=torch.float32)
        grad_mixed = torch.zeros_like(mixed) if grad_mixed is None else grad_mixed.contiguous()
        grad_loss = torch.zeros((), **f32) if grad_loss is None else grad_loss.float()
        loss_coef = (2.0 * ctx.loss_weight / batch) * grad_loss.reshape(())

        partial = torch.empty(batch, patterns + 2, n_tiles, **f32)
        kind = dot_operands(queries.dtype)
        config = pick_config("grad_stats", dim, features, kind)
        launch(_expert_grad_stats_kernel, _expert_grid(batch, features, config), config,
               queries, weight_compute, bias, mean, rstd, norm_weight, norm_bias, grad_mixed, mixed, loss_coef, partial,
               batch, dim, features, n_tiles, **constants)
        sums = partial.sum(-1)
        a_sums, gamma_sums, beta_sums = sums[:, :patterns], sums[:, patterns], sums[:, patterns + 1]
        grad_scores = (a_sums + beta_sums[:, None]) / ctx.mix_divisor
        a_mean = (a_sums / features).contiguous()
        b_mean = (gamma_sums / features).contiguous()

        config = pick_config("grad", dim, features, kind)
        n_row_blocks = triton.cdiv(batch, config["BLOCK_B"])  # each (row block, column) is written once
        d_gamma_partial = torch.empty(n_row_blocks, features, **f32)
        d_beta_partial = torch.empty(n_row_blocks, features, **f32)
        d_bias_partial = torch.empty(n_row_blocks, features, **f32)
        grad_queries = torch.zeros(batch * patterns, dim, **f32)
        grad_weight = torch.empty_like(weight)
        q_rows = queries.view(batch * patterns, dim)
        chunk = du_chunk_columns(batch, patterns, features)
        du = torch.empty(batch * patterns, chunk, device=queries.device, dtype=queries.dtype)
        for m_start in range(0, features, chunk):
            m_stop = min(m_start + chunk, features)
            du_chunk = du[:, :m_stop - m_start]
            launch(_expert_grad_kernel, _expert_grid(batch, m_stop - m_start, config), config,
                   queries, weight_compute, bias, scores, mean, rstd, norm_weight, grad_mixed, mixed, loss_coef,
                   a_mean, b_mean, du_chunk, d_gamma_partial, d_beta_partial, d_bias_partial, 1.0 / ctx.mix_divisor,
                   batch, dim, features, m_start, m_stop, du.stride(0), **constants)
            grad_queries += (du_chunk @ weight_compute[m_start:m_stop]).float()
            grad_weight[m_start:m_stop] = du_chunk.t() @ q_rows
        return (grad_queries.view_as(queries).to(queries.dtype), grad_scores.to(scores.dtype), grad_weight,
                d_bias_partial.sum(0).to(bias.dtype), d_gamma_partial.sum(0).to(norm_weight.dtype),
                d_beta_partial.sum(0).to(norm_bias.dtype), None, None, None)


class OutputProjectionFunction(torch.autograd.Function):
    """y = LayerNorm(GELU(h @ W_b)) with h [B, L, D], W_b [B, D, D_o]; saves only h and W_b.

    Backward recomputes z = h @ W_b (one batched GEMM, cheaper than keeping [B, L, D_o] alive until
    backward) and turns it into dz in place, so the output stage adds no activation memory of its own.
    """

    @staticmethod
    def forward(ctx, h, mixed, weight, bias, eps):
        z = torch.bmm(h, mixed)
        rows, width = z.numel() // z.shape[-1], z.shape[-1]
        block = triton.next_power_of_2(width)
        y = torch.empty_like(z)
        _gelu_layer_norm_fwd_kernel[(rows,)](z, y, weight, bias, width, eps, BLOCK=block,
                                             num_warps=row_warps(block))
        ctx.save_for_backward(h, mixed, weight)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
        h, mixed, weight = ctx.saved_tensors
        dz = torch.bmm(h, mixed)
        rows, width = dz.numel() // dz.shape[-1], dz.shape[-1]
        programs, rows_per_program = row_programs(rows, multiprocessors(dz.device))
        dw_partial = torch.empty(programs, width, device=dz.device, dtype=torch.float32)
        db_partial = torch.empty_like(dw_partial)
        block = triton.next_power_of_2(width)
        _gelu_layer_norm_bwd_kernel[(programs,)](dz, grad_y.contiguous(), weight, dw_partial, db_partial, rows,
                                                 width, ctx.eps, rows_per_program, BLOCK=block,
                                                 num_warps=row_warps(block))
        grad_h = torch.bmm(dz, mixed.transpose(1, 2))
        grad_mixed = torch.bmm(h.transpose(1, 2), dz)
        return grad_h, grad_mixed, dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype), None


def row_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


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
        mixed, experts_loss = ExpertMixFunction.apply(
            queries.contiguous(), scores.contiguous(), expert_weight.contiguous(), expert_bias.contiguous(),
            expert_norm_weight.contiguous(), expert_norm_bias.contiguous(), float(mix_divisor),
            float(experts_loss_weight), float(eps))
        y = OutputProjectionFunction.apply(h.contiguous(), mixed.view(batch, dim, out_dim),
                                           out_norm_weight.contiguous(), out_norm_bias.contiguous(), float(eps))
    return y, experts_loss
