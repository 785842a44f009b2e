"""Fused relation loss: matches `dpal.losses.relation_kl_reference` without storing student logits.

With S = Y Y^T / sqrt(D) per sample, p the target rows (int8 targets are log-domain codes:
p = softmax_j(q_ij * row scale_i)), P_i = sum_j p_ij and lse_i = logsumexp_j S_ij:

    KL_i = sum_j xlogy(p_ij, p_ij) - sum_j p_ij S_ij + P_i lse_i        loss = mean_{b,i} KL_i

Exponentials and logarithms run in base 2 on the special-function unit (S log2 e, one MUFU each).

Forward: one program per (block of rows, sample), the row blocks of a sample adjacent in the grid (its Y
stays in L2), makes its logits against all columns at once, each K step loading its row tile once for every
column block, then sweeps the column blocks with an online logsumexp (flash-attention style); S tiles live
only in registers. Columns go in full blocks, then what is left in one narrow tail block (N = 257:
4 x 64 + 16, where 5 x 64 spent a fifth of the work on padding). It writes each row's share of the loss,
KL_i / (B N), so that the loss is one sum, and keeps lse, P and the int8 rows' normaliser [B, N] for
backward. For int8 targets the normaliser is a second online logsumexp in the same sweep, over z = q * scale:
with A = sum_j 2^(z - m) (z - s), sum_j xlogy(p, p) - p S = ln 2 (A / sum_j 2^(z - m) - lse_t) and P_i = 1, so
no pre-pass reads the row first.
Backward: dKL/dS_ij = P_i softmax_ij - p_ij =: G_ij, and since S is symmetric,
dY = (G + G^T) Y / sqrt(D) (times the incoming gradient / (B N)). (G + G^T) is symmetric too, so one
program per tile pair I <= J (and sample) recomputes S_IJ, forms (G_IJ + G_JI^T) scaled — G_JI^T from the
same S tile with the column rows' lse and the transposed target tile — and writes it at (I, J) and its
transpose at (J, I): each unordered pair of tiles is computed once. The tail columns pair with every
row block in a second launch of narrow tiles; each program reads the incoming gradient itself. A batched
cuBLAS GEMM multiplies the result by Y. One call runs no torch op but the loss's sum and that GEMM. The only
N x N buffer is that gradient, in Y's dtype, the size of the target itself, alive during backward only.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels._common import (DOT_PRECISION, INTERPRETED, NAMESPACE, KernelConfig, PlannedLaunch, check_capability,
                             check_device, check_dtype, check_shape, dot_operands, fast_exp2, fast_log2, mma)

OP = "fused relation KL"

# Tiles (rows I x columns J, K step over D), pinned per (kernel, N, D, dot operands) from the sm_90 compile
# facts (`make check-sm90`; README "Kernel configurations"), never tuned at run time. Backward's tiles are
# square (BLOCK_I x BLOCK_I; the tail pairs BLOCK_I x tail_block), so its configs have no BLOCK_J. fp32
# operands (IEEE dots on FMA units) take K steps of 16 (Triton 3.6's tl.dot needs K >= 16). Shapes off the table
# take the default of their operand kind; the choice never depends on timing. The forward holds a row block's
# logits against all N columns in registers: with fp32 operands its 64 x 64 tiles spill at N = 257 with int8
# targets, so fp32 takes 32 x 32 tiles (clean under Triton 3.6 and 3.8 at every recipe shape and target).
DEFAULT_CONFIGS = {
    "fwd": {"bf16": KernelConfig.of(8, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_K=64),
            "fp16": KernelConfig.of(8, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_K=64),
            "fp32": KernelConfig.of(8, 3, BLOCK_I=32, BLOCK_J=32, BLOCK_K=16)},
    "bwd": {"bf16": KernelConfig.of(4, 3, BLOCK_I=64, BLOCK_K=64),
            "fp16": KernelConfig.of(4, 3, BLOCK_I=64, BLOCK_K=64),
            "fp32": KernelConfig.of(8, 3, BLOCK_I=64, BLOCK_K=16)}}
# The recipes' shapes: N = 257 (ViT teachers: CLS + 16x16 crowd grid) or 64 (SOLIDER: 8x8), D = 768 or 1024.
PINNED_CONFIGS = {(kernel, n, dim, kind): config for kernel, by_kind in DEFAULT_CONFIGS.items()
                  for kind, config in by_kind.items() for n, dim in ((257, 768), (257, 1024), (64, 1024))}
TARGET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)


_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = 1.4426950408889634
_LOG2E_C = tl.constexpr(_LOG2E)
_SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)  # log2 of anything below is flushed by lg2.approx.ftz


@triton.jit
def _logits(y_ptr, offs_i, offs_j, N, D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
            BLOCK_K: tl.constexpr, MASK_J: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Y_I Y_J^T for one sample (y_ptr at the sample), fp32; rows past N read as zeros. Columns are all < N
    unless MASK_J. D is a constexpr: the K loop has no bounds checks when BLOCK_K divides it."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    row_ok = (offs_i < N)[:, None]
    col_ok = (offs_j < N)[None, :]
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_mask = row_ok if D % BLOCK_K == 0 else row_ok & (offs_k < D)[None, :]
        a = tl.load(y_ptr + offs_i[:, None] * D + offs_k[None, :], mask=a_mask, other=0.0)
        b_at = y_ptr + offs_j[None, :] * D + offs_k[:, None]
        if MASK_J:
            b = tl.load(b_at, mask=col_ok if D % BLOCK_K == 0 else col_ok & (offs_k < D)[:, None], other=0.0)
        elif D % BLOCK_K:
            b = tl.load(b_at, mask=(offs_k < D)[:, None], other=0.0)
        else:
            b = tl.load(b_at)
        acc = mma(a, b, acc, DOT_PRECISION, INTERPRETED)
    return acc


@triton.jit
def _target_tile(t_ptr, row_scale2, target_lse2, rows, cols, N, MASK_J: tl.constexpr, QUANTIZED: tl.constexpr,
                 INTERPRETED: tl.constexpr):
    """Target probabilities p[rows, cols] of one sample, fp32, 0 outside; int8 codes decode as
    p = 2^(q * row_scale2 - target_lse2), the row's scale and log-normaliser in base 2."""
    ok = (rows < N)[:, None] & (cols < N)[None, :] if MASK_J else (rows < N)[:, None]
    p = tl.load(t_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0).to(tl.float32)
    if QUANTIZED:
        p = tl.where(ok, fast_exp2(p * row_scale2[:, None] - target_lse2[:, None], INTERPRETED), 0.0)
    return p


@triton.jit
def _row_logits(y_ptr, offs_i, N, D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                BLOCK_K: tl.constexpr, NUM_J: tl.constexpr, TAIL_J: tl.constexpr, DOT_PRECISION: tl.constexpr,
                INTERPRETED: tl.constexpr):
    """Y_I Y^T for one sample's row block against all N columns, fp32: NUM_J full column blocks of BLOCK_J (a
    tuple of tiles) and the tail block of TAIL_J (a [BLOCK_I, 16] tile of zeros when there is none). Each K
    step loads the row tile once and multiplies it with every column block, so a program reads its rows once
    whatever N is. Rows past N read as zeros."""
    accs = ()
    for j in tl.static_range(NUM_J):
        accs = accs + (tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32),)
    tail = tl.zeros((BLOCK_I, TAIL_J if TAIL_J else 16), dtype=tl.float32)
    row_ok = (offs_i < N)[:, None]
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (offs_k < D)[:, None]
        a = tl.load(y_ptr + offs_i[:, None] * D + offs_k[None, :],
                    mask=row_ok if D % BLOCK_K == 0 else row_ok & (offs_k < D)[None, :], other=0.0)
        stepped = ()
        for j in tl.static_range(NUM_J):
            b_at = y_ptr + (j * BLOCK_J + tl.arange(0, BLOCK_J))[None, :] * D + offs_k[:, None]
            b = tl.load(b_at) if D % BLOCK_K == 0 else tl.load(b_at, mask=k_ok, other=0.0)
            stepped = stepped + (mma(a, b, accs[j], DOT_PRECISION, INTERPRETED),)
        accs = stepped
        if TAIL_J:
            offs_t = NUM_J * BLOCK_J + tl.arange(0, TAIL_J)
            t_ok = (offs_t < N)[None, :] if D % BLOCK_K == 0 else (offs_t < N)[None, :] & k_ok
            tail = mma(a, tl.load(y_ptr + offs_t[None, :] * D + offs_k[:, None], mask=t_ok, other=0.0), tail,
                       DOT_PRECISION, INTERPRETED)
    return accs, tail


@triton.jit
def _kl_block(s2, t_ptr, row_scale2, offs_i, j0, N, state, QUANTIZED: tl.constexpr, BLOCK_J: tl.constexpr,
              MASK_J: tl.constexpr, INTERPRETED: tl.constexpr):
    """One column block of the forward's online pass, in base 2, given its logits s2 = S log2 e. state per
    row: running max and sum of 2^s2, then for float targets cross2 = sum p (log2 p - s2) and P = sum p; for
    int8 codes, with z2 = q * row_scale2 (p = 2^z2 / sum_j 2^z2), a second online pass: A = sum 2^(z2 - m)
    (z2 - s2) and the running max m and sum of 2^z2, so that no pre-pass over the row is needed for its
    normaliser."""
    running_max, running_sum, acc, mass, target_max, target_sum = state
    offs_j = j0 + tl.arange(0, BLOCK_J)
    col_ok = (offs_j < N)[None, :]
    in_row = tl.where(col_ok, s2, float("-inf")) if MASK_J else s2
    new_max = tl.maximum(running_max, tl.max(in_row, axis=1))
    running_sum = running_sum * fast_exp2(running_max - new_max, INTERPRETED) + \
        tl.sum(fast_exp2(in_row - new_max[:, None], INTERPRETED), axis=1)
    ok = (offs_i < N)[:, None] & col_ok if MASK_J else (offs_i < N)[:, None]
    q = tl.load(t_ptr + offs_i[:, None] * N + offs_j[None, :], mask=ok, other=0).to(tl.float32)
    if QUANTIZED:
        z2 = q * row_scale2[:, None]
        in_target_row = tl.where(col_ok, z2, float("-inf")) if MASK_J else z2
        new_target_max = tl.maximum(target_max, tl.max(in_target_row, axis=1))
        rescale = fast_exp2(target_max - new_target_max, INTERPRETED)
        weight = fast_exp2(in_target_row - new_target_max[:, None], INTERPRETED)
        target_sum = target_sum * rescale + tl.sum(weight, axis=1)
        acc = acc * rescale + tl.sum(weight * (z2 - s2), axis=1)
        target_max = new_target_max
    else:  # p log2 p = 0 where p = 0: log2 of the smallest normal float stays finite
        acc += tl.sum(q * (fast_log2(tl.maximum(q, _SMALLEST_NORMAL), INTERPRETED) - s2), axis=1)
        mass += tl.sum(q, axis=1)
    return new_max, running_sum, acc, mass, target_max, target_sum


@triton.jit
def _relation_kl_fwd_kernel(y_ptr, t_ptr, row_scale_ptr, row_loss_ptr, lse2_ptr, mass_ptr, target_lse2_ptr, N,
                            logit_scale2, row_weight, D: tl.constexpr, QUANTIZED: tl.constexpr,
                            BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, NUM_J: tl.constexpr,
                            TAIL_J: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Per row: row_loss = KL_i * row_weight (1 / (B N)), KL_i = sum_j p log p - p S + P lse in nats; lse2 =
    log2 of sum_j exp(S); P = sum_j p (1 for int8 codes); for int8 codes the target normaliser target_lse2 =
    log2 sum_j 2^z2 (p = 2^(z2 - target_lse2)), for float targets 0. The program's logits are made first, for
    all columns at once (`_row_logits`: NUM_J = N // BLOCK_J full blocks, then the N mod BLOCK_J left in one
    block of TAIL_J; N = 257: 4 x 64 + 16), so the registers hold BLOCK_I x N fp32 values: the recipes' N
    (257, 64) fit, a much larger N would spill. The online pass then takes the tail block first, then the full
    ones."""
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    b = tl.program_id(1).to(tl.int64)
    y_ptr += b * N * D
    t_ptr += b * N * N
    row_ok = offs_i < N
    row_scale2 = tl.zeros((BLOCK_I,), dtype=tl.float32)
    if QUANTIZED:
        row_scale2 = tl.load(row_scale_ptr + b * N + offs_i, mask=row_ok, other=0.0).to(tl.float32) * _LOG2E_C
    zero = tl.zeros((BLOCK_I,), dtype=tl.float32)
    minus_inf = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    state = (minus_inf, zero, zero, zero, minus_inf, zero)
    logits, tail = _row_logits(y_ptr, offs_i, N, D, BLOCK_I, BLOCK_J, BLOCK_K, NUM_J, TAIL_J, DOT_PRECISION,
                               INTERPRETED)
    if TAIL_J:
        state = _kl_block(tail * logit_scale2, t_ptr, row_scale2, offs_i, NUM_J * BLOCK_J, N, state, QUANTIZED,
                          TAIL_J, True, INTERPRETED)
    for j in tl.static_range(NUM_J):
        state = _kl_block(logits[j] * logit_scale2, t_ptr, row_scale2, offs_i, j * BLOCK_J, N, state, QUANTIZED,
                          BLOCK_J, False, INTERPRETED)
    running_max, running_sum, acc, mass, target_max, target_sum = state
    lse2 = running_max + fast_log2(running_sum, INTERPRETED)
    if QUANTIZED:  # p = 2^(z2 - target_lse2): sum_j p (log2 p - s2) = A / sum_j 2^(z2 - m) - target_lse2, P = 1
        target_lse2 = target_max + fast_log2(target_sum, INTERPRETED)
        kl2 = acc / target_sum - target_lse2 + lse2
        mass = tl.full((BLOCK_I,), 1.0, dtype=tl.float32)
    else:
        target_lse2 = tl.zeros((BLOCK_I,), dtype=tl.float32)
        kl2 = acc + mass * lse2
    out = b * N + offs_i
    tl.store(row_loss_ptr + out, kl2 * (_LN2 * row_weight), mask=row_ok)
    tl.store(lse2_ptr + out, lse2, mask=row_ok)
    tl.store(mass_ptr + out, mass, mask=row_ok)
    tl.store(target_lse2_ptr + out, target_lse2, mask=row_ok)


@triton.jit
def _relation_kl_bwd_kernel(y_ptr, t_ptr, row_scale_ptr, lse2_ptr, mass_ptr, target_lse2_ptr, pairs_ptr, grad_ptr,
                            out_ptr, N, logit_scale2, grad_scale, D: tl.constexpr, QUANTIZED: tl.constexpr,
                            BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                            MASK_J: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """For the tile pair (I, J) at pairs[program] (I <= J): out[b, I, J] = d loss / d S_IJ + (d loss / d S_JI)^T
    times the incoming gradient (grad_ptr) and grad_scale (1 / (B N) of the mean, times the scale of S), and
    out[b, J, I], its transpose (the gradient of a symmetric S is taken symmetric), so each unordered pair of
    tiles is computed once."""
    pair = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    i0 = tl.load(pairs_ptr + 2 * pair)
    j0 = tl.load(pairs_ptr + 2 * pair + 1)
    offs_i = i0 + tl.arange(0, BLOCK_I)
    offs_j = j0 + tl.arange(0, BLOCK_J)
    y_ptr += b * N * D
    t_ptr += b * N * N
    out_ptr += b * N * N
    s2 = _logits(y_ptr, offs_i, offs_j, N, D, BLOCK_I, BLOCK_J, BLOCK_K, MASK_J, DOT_PRECISION, INTERPRETED) \
        * logit_scale2
    row_ok = offs_i < N
    col_ok = offs_j < N
    at_i = b * N + offs_i
    at_j = b * N + offs_j
    lse2_i = tl.load(lse2_ptr + at_i, mask=row_ok, other=0.0)
    lse2_j = tl.load(lse2_ptr + at_j, mask=col_ok, other=0.0)
    mass_i = tl.load(mass_ptr + at_i, mask=row_ok, other=0.0)
    mass_j = tl.load(mass_ptr + at_j, mask=col_ok, other=0.0)
    scale_i = tl.zeros((BLOCK_I,), dtype=tl.float32)
    scale_j = tl.zeros((BLOCK_J,), dtype=tl.float32)
    if QUANTIZED:
        scale_i = tl.load(row_scale_ptr + at_i, mask=row_ok, other=0.0).to(tl.float32) * _LOG2E_C
        scale_j = tl.load(row_scale_ptr + at_j, mask=col_ok, other=0.0).to(tl.float32) * _LOG2E_C
    p_ij = _target_tile(t_ptr, scale_i, tl.load(target_lse2_ptr + at_i, mask=row_ok, other=0.0), offs_i, offs_j, N,
                        True, QUANTIZED, INTERPRETED)
    p_ji = _target_tile(t_ptr, scale_j, tl.load(target_lse2_ptr + at_j, mask=col_ok, other=0.0), offs_j, offs_i, N,
                        True, QUANTIZED, INTERPRETED)
    g = mass_i[:, None] * fast_exp2(s2 - lse2_i[:, None], INTERPRETED) + \
        mass_j[None, :] * fast_exp2(s2 - lse2_j[None, :], INTERPRETED) - p_ij - tl.trans(p_ji)
    g = (g * (tl.load(grad_ptr).to(tl.float32) * grad_scale)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_i[:, None] * N + offs_j[None, :], g, mask=row_ok[:, None] & col_ok[None, :])
    if i0 != j0:
        tl.store(out_ptr + offs_j[:, None] * N + offs_i[None, :], tl.trans(g), mask=col_ok[:, None] & row_ok[None, :])


def tail_block(n: int, block: int) -> int:
    """Width of the block that covers the n mod block columns left after the full blocks: a power of two, at
    least 16 (the smallest wgmma N that Triton emits), 0 when block divides n."""
    left = n % block
    return max(16, triton.next_power_of_2(left)) if left else 0


def tile_pairs(n: int, block: int, tail: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Backward's tile pairs (row start, column start), I <= J: the full block x full block pairs, and the pairs
    whose columns are the tail (every full row block with the tail, and the tail with itself)."""
    starts = range(0, n // block * block, block)
    full = [(i, j) for i in starts for j in starts if i <= j]
    tail_pairs = [(i, n // block * block) for i in [*starts, n // block * block]] if tail else []
    return full, tail_pairs


def pick_config(kernel: str, n: int, dim: int, kind: str) -> KernelConfig:
    """The pinned config of kernel "fwd" or "bwd" for [B, n, dim] tokens whose dots run on `kind`
    (`kernels._common.dot_operands`); see PINNED_CONFIGS."""
    return PINNED_CONFIGS.get((kernel, n, dim, kind), DEFAULT_CONFIGS[kernel][kind])


@functools.lru_cache(maxsize=64)  # planned once per shape: the op asks at every call, forward and backward
def launch_plan(batch: int, n: int, dim: int, dtype: torch.dtype, target_dtype: torch.dtype,
                scale_dtype: torch.dtype = torch.float32) -> dict:
    """The op's launches for tokens [batch, n, dim] in `dtype` and targets in `target_dtype` (int8 codes with
    row scales in `scale_dtype`): "forward", one launch, and "backward", one per tile set (full tiles, then the
    tail's), each with its tile pairs under "pairs" (a tuple the op uploads once per device)."""
    quantized = target_dtype == torch.int8
    kind = dot_operands(dtype)
    f32 = torch.float32
    operands = dict(y_ptr=dtype, t_ptr=target_dtype, row_scale_ptr=scale_dtype if quantized else target_dtype,
                    lse2_ptr=f32, mass_ptr=f32, target_lse2_ptr=f32)
    constants = dict(N=n, logit_scale2=_LOG2E / math.sqrt(dim), D=dim, QUANTIZED=quantized,
                     DOT_PRECISION=DOT_PRECISION, INTERPRETED=INTERPRETED)
    fwd = pick_config("fwd", n, dim, kind)
    forward = PlannedLaunch(_relation_kl_fwd_kernel, (triton.cdiv(n, fwd["BLOCK_I"]), batch), fwd,
                            operands | dict(row_loss_ptr=f32),
                            constants | dict(row_weight=1.0 / (batch * n), NUM_J=n // fwd["BLOCK_J"],
                                             TAIL_J=tail_block(n, fwd["BLOCK_J"])))
    bwd = pick_config("bwd", n, dim, kind)
    block = bwd["BLOCK_I"]
    tail = tail_block(n, block)
    backward = []
    for pairs, block_j, ragged in zip(tile_pairs(n, block, tail), (block, tail), (False, True)):
        if pairs:
            backward.append((PlannedLaunch(
                _relation_kl_bwd_kernel, (len(pairs), batch), bwd.with_tiles(BLOCK_J=block_j),
                operands | dict(pairs_ptr=torch.int32, grad_ptr=f32, out_ptr=dtype),
                # the mean's 1 / (B N), times the scale of S (dS / dY = (. + .^T) Y / sqrt(D))
                constants | dict(grad_scale=1.0 / (batch * n * math.sqrt(dim)), MASK_J=ragged),
                part="tail tiles" if ragged else "full tiles"), tuple(pairs)))
    return dict(forward=forward, backward=backward)


@functools.lru_cache(maxsize=64)
def _pairs_on(pairs: tuple, device: torch.device) -> torch.Tensor:
    """Backward's tile pairs on `device`, uploaded once per (shape, device): an upload per step would be a host
    synchronisation on the step path."""
    return torch.tensor(pairs, dtype=torch.int32, device=device)


@torch.library.custom_op(f"{NAMESPACE}::relation_kl_forward", mutates_args=())
def relation_kl_forward(y: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor | None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse2, P, target_lse2): the loss and the per-row [B, N] values backward needs."""
    check_capability(OP, y.device)
    batch, n, dim = y.shape
    quantized = row_scale is not None
    row_scale_arg = row_scale if quantized else target  # never read when not quantized
    forward = launch_plan(batch, n, dim, y.dtype, target.dtype, row_scale_arg.dtype)["forward"]
    row_loss, lse2, mass, target_lse2 = (torch.empty(batch, n, device=y.device, dtype=torch.float32)
                                         for _ in range(4))
    forward(y_ptr=y, t_ptr=target, row_scale_ptr=row_scale_arg, row_loss_ptr=row_loss, lse2_ptr=lse2,
            mass_ptr=mass, target_lse2_ptr=target_lse2)
    return row_loss.sum(), lse2, mass, target_lse2


@relation_kl_forward.register_fake
def _(y, target, row_scale):
    rows = y.new_empty(y.shape[:2], dtype=torch.float32)
    return y.new_empty((), dtype=torch.float32), rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.custom_op(f"{NAMESPACE}::relation_kl_backward", mutates_args=())
def relation_kl_backward(grad_loss: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                         row_scale: torch.Tensor | None, lse2: torch.Tensor, mass: torch.Tensor,
                         target_lse2: torch.Tensor) -> torch.Tensor:
    """d loss / d y."""
    batch, n, dim = y.shape
    quantized = row_scale is not None
    row_scale_arg = row_scale if quantized else target
    grad_logits = torch.empty(batch, n, n, device=y.device, dtype=y.dtype)
    for planned, pairs in launch_plan(batch, n, dim, y.dtype, target.dtype, row_scale_arg.dtype)["backward"]:
        planned(y_ptr=y, t_ptr=target, row_scale_ptr=row_scale_arg, lse2_ptr=lse2, mass_ptr=mass,
                target_lse2_ptr=target_lse2, pairs_ptr=_pairs_on(pairs, y.device), grad_ptr=grad_loss.float(),
                out_ptr=grad_logits)
    return torch.bmm(grad_logits, y)


@relation_kl_backward.register_fake
def _(grad_loss, y, target, row_scale, lse2, mass, target_lse2):
    return torch.empty_like(y)


def _relation_kl_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output[1:])
    ctx.set_materialize_grads(False)  # no zero gradients made for the per-row values (nothing differentiates them)


def _relation_kl_grad(ctx, grad_loss, *_):
    return relation_kl_backward(grad_loss, *ctx.saved_tensors), None, None


relation_kl_forward.register_autograd(_relation_kl_grad, setup_context=_relation_kl_setup)


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
        return relation_kl_forward(y.contiguous(), target.contiguous(), target_row_scale)[0]
