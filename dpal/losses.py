"""DPAL losses (spec section 6) and the relation matrix the teacher targets are made of.

`relation_kl_reference` is the plain-PyTorch reference the fused Triton relation loss must match;
callers call the op `relation_kl` (`dpal.dispatch.Op`), which runs what is registered for the inputs' device.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpal.config import OptimConfig
from dpal.dispatch import Op


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    # Softmax over 257 logits loses too much in bf16/fp16; float64 inputs stay float64 (tests).
    return x if x.dtype == torch.float64 else x.float()


def relation_logits(tokens: torch.Tensor) -> torch.Tensor:
    """Scaled token similarities F F^T / sqrt(D) of tokens [B,N,D] -> [B,N,N] (float32 or float64).

    Project choice (spec 6): float32 even under autocast, which would round the product to bf16 (a logit
    near 28 in steps of 0.125). The softmax of float32 logits stays float32 under autocast as well."""
    tokens = _at_least_float32(tokens)
    with torch.autocast(tokens.device.type, enabled=False):
        return tokens @ tokens.transpose(-1, -2) / math.sqrt(tokens.shape[-1])


def relation_matrix(tokens: torch.Tensor) -> torch.Tensor:
    """Row-stochastic token relation softmax(F F^T / sqrt(D)) of tokens [B,N,D] -> [B,N,N]."""
    return relation_logits(tokens).softmax(dim=-1)


# Project choice: int8 relation targets code each row's log-probabilities, not its probabilities.
# A linear code of p (q * max / 127) zeroes every entry below max / 254, which is most of a 257-token
# row, and costs KL ~0.2 (as much as the relation loss itself late in training). In the log domain
# the rounding error is relative: a step of RELATION_LOG_RANGE / 255 nats bounds each entry's error to
# about +-4% and the KL to step^2 / 8 ~ 8e-4. Entries more than RELATION_LOG_RANGE nats below the row's largest are raised to
# that floor (at most 256 * e^-20 ~ 5e-7 of extra mass).
RELATION_LOG_RANGE = 20.0


def quantize_relation(probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row distributions [..., N] -> (int8 q, float32 scale [...]) with softmax(q * scale) ~= p.

    log p is shifted so that its row maximum becomes code 127 and the floor RELATION_LOG_RANGE nats
    below becomes -128; softmax ignores the shift. A uniform row gets scale 0 (softmax(0) is uniform).
    """
    log_p = probabilities.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    top = log_p.amax(dim=-1, keepdim=True)
    log_p = torch.maximum(log_p, top - RELATION_LOG_RANGE)
    scale = (top - log_p.amin(dim=-1, keepdim=True)) / 255
    codes = torch.where(scale > 0, (log_p - top) / scale.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return (codes.round() + 127).clamp(-128, 127).to(torch.int8), scale.squeeze(-1)


def relation_probabilities(target: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A stored relation target -> row probabilities: float targets as they are, int8 codes from
    `quantize_relation` as softmax(q * scale) (float32 at least)."""
    if target.dtype == torch.int8:
        return dequantize_rows(target, row_scale).softmax(dim=-1)
    return dequantize_rows(target, row_scale)


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 (the int8 local targets): values ~= q * scale, scale = max|row| / 127
    (all-zero rows: scale 0); `dequantize_rows` is the inverse."""
    scale = values.abs().amax(dim=-1) / 127
    q = torch.where(scale[..., None] > 0, values / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None],
                    torch.zeros_like(values))
    return q.round_().clamp_(-127, 127).to(torch.int8), scale.float()


def dequantize_rows(target: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A stored target -> float (float32 at least): float16/32/64 as is, int8 q with a scale per row
    (per last-axis vector, shape target.shape[:-1]) as q * scale. Local targets are stored so; int8
    relation targets are log-domain codes (`relation_probabilities`)."""
    if target.dtype == torch.int8:
        if row_scale is None:
            raise ValueError("target is int8 but no row scale was given; an int8 target means q * row scale, "
                             "so pass its scales (local_scale / relation_scale)")
        if row_scale.shape != target.shape[:-1]:
            raise ValueError(f"row scale has shape {tuple(row_scale.shape)}, expected "
                             f"{tuple(target.shape[:-1])} (one scale per target row)")
        scale = _at_least_float32(row_scale)
        return target.to(scale.dtype) * scale[..., None]
    if not target.is_floating_point():
        raise ValueError(f"target dtype {target.dtype} is not supported; use float16/bfloat16/float32/"
                         "float64 values or int8 with row scales")
    if row_scale is not None:
        raise ValueError(f"a row scale is only meaningful for int8 targets; got a {target.dtype} target with one")
    return _at_least_float32(target)


def relation_kl_reference(y: torch.Tensor, target: torch.Tensor,
                          target_row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """KL(R_t || R_s) with R_s = softmax(Y Y^T / sqrt(D)): summed over the last axis, mean over rows and batch.

    y [B,N,D] (the decoder output on the crowd view), target [B,N,N] probabilities (float), or int8
    codes with target_row_scale [B,N] meaning p = softmax(q * scale) (`quantize_relation`). Entries with
    p = 0 contribute 0 (x log x -> 0).
    """
    if target.shape != (*y.shape[:-1], y.shape[-2]):
        raise ValueError(f"relation target has shape {tuple(target.shape)}, expected "
                         f"{(*y.shape[:-1], y.shape[-2])} for tokens of shape {tuple(y.shape)}")
    log_student = relation_logits(y).log_softmax(dim=-1)
    p = relation_probabilities(target, target_row_scale).to(log_student.dtype)
    kl_rows = (torch.xlogy(p, p) - p * log_student).sum(dim=-1)
    return kl_rows.mean()


# What the training step calls: the reference unless an implementation is registered for the inputs' device.
relation_kl = Op("relation_kl", relation_kl_reference)


def global_loss(student_globals: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean over the student's global outputs (global view + each local crop) of MSE to the teacher's.

    Each output is [B,D_t] (or [B,1,D_t]); MSE is the mean over features and batch.
    """
    if not student_globals:
        raise ValueError("global_loss needs at least one student global output")
    target = target.reshape(target.shape[0], -1)
    losses = [F.mse_loss(_at_least_float32(s.reshape(target.shape)), _at_least_float32(target))
              for s in student_globals]
    return torch.stack(losses).mean()


def local_loss(student_local: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE(m * s_l, m * t_l) over batch, tokens and features; student/target [B,N,D_t], mask [B,N]."""
    if mask.shape != student_local.shape[:-1] or target.shape != student_local.shape:
        raise ValueError(f"local_loss shapes disagree: student {tuple(student_local.shape)}, "
                         f"target {tuple(target.shape)}, mask {tuple(mask.shape)} (expected [B,N,D], [B,N,D], [B,N])")
    s = _at_least_float32(student_local)
    m = mask.to(s.dtype)[..., None]
    return F.mse_loss(m * s, m * target.to(s.dtype))


def moe_weight(epoch: int | float, optim: OptimConfig) -> float:
    """Weight of the MoE gate's aux loss: optim.moe_weight[0] before moe_switch_epoch, [1] from then on."""
    before, after = optim.moe_weight
    return before if epoch < optim.moe_switch_epoch else after


class LossTerms(NamedTuple):
    """One step's loss terms (spec section 6) in the one order that the step, the metrics and the log use:
    the total first, then L_global, L_local, L_relation, the unweighted MoE gate loss and L_exp. Tensors on
    the step's path, floats once read on the host."""
    total: torch.Tensor | float
    global_: torch.Tensor | float  # `global` is a Python keyword; `names()` spells it as written everywhere else
    local: torch.Tensor | float
    relation: torch.Tensor | float
    moe: torch.Tensor | float
    experts: torch.Tensor | float

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The terms' written names, in order (metrics columns, log tags, messages)."""
        return tuple(field.rstrip("_") for field in cls._fields)

    @classmethod
    def summed(cls, global_, local, relation, moe, experts, moe_loss_weight: float) -> LossTerms:
        """The terms with their total = L_global + L_local + L_relation + w_moe * L_moe + L_exp."""
        return cls(global_ + local + relation + moe_loss_weight * moe + experts, global_, local, relation, moe,
                   experts)

    def by_name(self) -> dict:
        """{written name: value} in order (a metrics row, a message)."""
        return dict(zip(self.names(), self))
