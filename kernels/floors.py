"""The useful FLOPs and compulsory HBM bytes of one call of each fused op, forward and backward: the floors
that `kernels.bench` holds its measurements against and `kernels.cost_model` its predictions.

FLOPs are the useful GEMM FLOPs (forward, plus twice that for backward), what any implementation must do;
what the fused kernels execute (they recompute instead of storing) is the cost model's count, from their launch
plans. Bytes are the compulsory traffic of an implementation that keeps only W_b (decoder) or nothing N x N
(relation) between forward and backward. Pure arithmetic: no torch, no triton.
"""
from __future__ import annotations

from dpal.config import DecoderSpec

PATTERNS = DecoderSpec.num_patterns


def decoder_flops(batch, dim, out_dim, tokens, patterns=PATTERNS) -> float:
    expert = 2.0 * batch * patterns * dim * dim * out_dim
    output = 2.0 * batch * tokens * dim * out_dim
    return 3.0 * (expert + output)


def decoder_bytes(batch, dim, out_dim, tokens, itemsize, patterns=PATTERNS) -> float:
    features = dim * out_dim
    weight = 3.0 * features * dim  # read forward, read backward, gradient written
    mixed = 6.0 * batch * features  # W_b written, read by bmm, read twice in backward; dW_b written + read
    tokens_in = 3.0 * batch * tokens * dim  # h read forward and backward, dh written
    tokens_out = 4.0 * batch * tokens * out_dim  # z written + read back (the row kernel), y written, dy read
    queries = 3.0 * batch * patterns * dim
    return itemsize * (weight + mixed + tokens_in + tokens_out + queries)


def relation_flops(batch, tokens, dim) -> float:
    # S forward, then dY = (G + G^T) Y once (S is symmetric).
    return 2.0 * 2.0 * batch * tokens * tokens * dim


def relation_bytes(batch, tokens, dim, itemsize, target_itemsize) -> float:
    return itemsize * 3.0 * batch * tokens * dim + target_itemsize * 2.0 * batch * tokens * tokens
