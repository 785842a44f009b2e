"""The coding of the targets: a view set's teacher targets as the store holds them, encoded and decoded.

`Targets` has one field per argument of `dpal.distill.distill_step_losses`; which store array holds each
field is the schema's table (`formats.schema.store_arrays`). The cache stage encodes the teacher's outputs
(`encode_targets`) into the store's format and writes `arrays()`; the trainer reads the arrays back
(`read_targets`) and passes `loss_arguments()`, still coded (the loss and the fused kernels decode int8 rows
themselves, with `dpal.losses`); `verify` compares `decoded()` floats.

Formats (`formats.schema.TARGET_FORMATS`): float16 keeps every target in float16. int8 keeps the global target
and the mask in float16 and codes the local tokens per row (q = round(x / s), s = max|row| / 127) and the
relation rows as log-probability codes (`dpal.losses.quantize_relation`: softmax(q * s) gives the row back),
each with a float32 scale per row. compact (`CompactCoding`, docs/stores.md) keeps the global target and
the mask in float16, the local tokens as coefficients on a low-rank basis fitted once per store (`TokenBasis`,
kept beside the arrays) and the relation rows as their top-k entries plus the mass of the others; knobs
`formats.schema.CompactKnobs` (rank and bits of the tokens, k and bits of the relation rows). A compact batch
is decoded by `CompactTargets.loss_arguments()` on whatever device it sits on: the trainer stages it on the
training device, so the step takes the same float targets as from a float16 store.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from dpal.losses import (RELATION_LOG_RANGE, dequantize_rows, quantize_relation, quantize_rows,
                         relation_probabilities)
from formats.schema import CompactKnobs, array_fields

# Store array -> Targets field (= distill_step_losses argument); int8 stores hold every one.
_FIELDS = array_fields("int8")


@dataclass(frozen=True)
class Targets:
    """Teacher targets of a batch of view sets. Shapes: global [B, D_t], local [B, N, D_t], mask [B, N] in
    [0, 1], relation [B, Nc, Nc] row probabilities; int8-coded rows carry their scales [B, N] / [B, Nc]."""

    global_target: torch.Tensor
    local_target: torch.Tensor
    local_mask: torch.Tensor
    relation_target: torch.Tensor
    local_scale: torch.Tensor | None = None
    relation_scale: torch.Tensor | None = None

    @classmethod
    def encode(cls, *, global_: torch.Tensor, local: torch.Tensor, mask: torch.Tensor, relation: torch.Tensor,
               target_format: str) -> "Targets":
        """Float teacher outputs -> the coding of `target_format` (on their device)."""
        if target_format not in ("float16", "int8"):
            raise ValueError(f"{target_format!r} is not coded by Targets.encode (float16 or int8; compact: "
                             f"CompactCoding.encode)")
        if target_format == "int8":
            (local, local_scale), (relation, relation_scale) = quantize_rows(local), quantize_relation(relation)
        else:
            local, relation, local_scale, relation_scale = local.half(), relation.half(), None, None
        return cls(global_.half(), local, mask.half(), relation, local_scale, relation_scale)

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor | np.ndarray]) -> "Targets":
        """Store arrays (named as the schema's table names them; others, such as the view records, ignored)
        -> Targets."""
        return cls(**{field: torch.as_tensor(arrays[name]) for name, field in _FIELDS.items() if name in arrays})

    def arrays(self) -> dict[str, torch.Tensor]:
        """The store arrays holding these targets (no entry for an absent scale)."""
        return {name: getattr(self, field) for name, field in _FIELDS.items() if getattr(self, field) is not None}

    def loss_arguments(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `distill_step_losses` (no entry for an absent scale)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if getattr(self, field.name) is not None}

    def to(self, device: torch.device, *, non_blocking: bool = False) -> "Targets":
        return Targets(**{name: value.to(device, non_blocking=non_blocking)
                          for name, value in self.loss_arguments().items()})

    def decoded(self) -> "Targets":
        """Float targets (float32 at least): int8 local rows times their scales, relation rows as probabilities."""
        return Targets(self.global_target.float(), dequantize_rows(self.local_target, self.local_scale),
                       self.local_mask.float(), relation_probabilities(self.relation_target, self.relation_scale))


# ---------------------------------------------------------------------------------------------- compact


def quantize_log4(probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row distributions [..., k] -> (uint8 [..., ceil(k / 2)] holding two 4-bit codes each, float32 scale
    [...]) with softmax(code * scale) ~= p: log p over the row's own range (at most RELATION_LOG_RANGE nats)
    in 15 steps. A flat row gets fine steps, a peaked one coarse steps on entries of little mass."""
    log_p = probabilities.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    top = log_p.amax(dim=-1, keepdim=True)
    log_p = torch.maximum(log_p, top - RELATION_LOG_RANGE)
    scale = (top - log_p.amin(dim=-1, keepdim=True)) / 15
    codes = torch.where(scale > 0, (log_p - top) / scale.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    codes = (codes.round() + 15).clamp(0, 15).to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale.squeeze(-1)


def dequantize_log4(packed: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """`quantize_log4`'s codes of k entries per row -> the row distributions (float32)."""
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)[..., :k]
    return (codes.float() * scale.float()[..., None]).softmax(dim=-1)


@dataclass(frozen=True, eq=False)  # tensor fields
class TokenBasis:
    """Principal directions of teacher patch tokens (largest variance first), fitted on the calibration
    images as the shape mask is. A token x is kept as its whitened coefficients c = (x - mean) @ rows^T / scales
    and read as mean + (c * scales) @ rows. Whitening gives every coefficient of a token the same range, so
    one int8 scale per token does not spend its steps on the leading direction alone."""

    mean: torch.Tensor  # [D] float32
    rows: torch.Tensor  # [rank, D] float32, orthonormal
    scales: torch.Tensor  # [rank] float32: the standard deviation along each direction

    @classmethod
    def fit(cls, tokens: torch.Tensor, rank: int) -> "TokenBasis":
        """Fit on tokens [..., D] (any leading shape), in float64."""
        flat = tokens.reshape(-1, tokens.shape[-1]).double()
        mean = flat.mean(0)
        centred = flat - mean
        variances, vectors = torch.linalg.eigh(centred.T @ centred / max(1, len(flat) - 1))  # ascending
        scales = variances.flip(0)[:rank].clamp_min(0).sqrt()
        # Weak directions are floored at 1/16 of the leading one: the calibration sample underrates them, and
        # a token of another image, amplified along them, would take its int8 scale from them.
        scales = scales.clamp_min(max(float(scales[0]) / 16, torch.finfo(torch.float32).tiny))
        return cls(mean.float(), vectors.flip(-1)[:, :rank].T.contiguous().float(), scales.float())

    def save(self, path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, mean=self.mean.numpy(), rows=self.rows.numpy(), scales=self.scales.numpy())

    @classmethod
    def load(cls, path) -> "TokenBasis":
        with np.load(path) as data:
            return cls(*(torch.from_numpy(data[name].astype(np.float32)) for name in ("mean", "rows", "scales")))

    def encode(self, tokens: torch.Tensor, *, whiten: bool) -> torch.Tensor:
        """Tokens [..., D] -> coefficients [..., rank] (float32, on the basis' device), whitened for int8 codes
        (a scale per token then bounds them); float16 coefficients are not, since a direction the sample
        underrates could overflow float16 once divided by its small deviation."""
        coefficients = (tokens.float() - self.mean) @ self.rows.T
        return coefficients / self.scales if whiten else coefficients

    def decode(self, coefficients: torch.Tensor, *, whiten: bool) -> torch.Tensor:
        return self.mean + (coefficients * self.scales if whiten else coefficients) @ self.rows

    def to(self, device: torch.device) -> "TokenBasis":
        return self if self.rows.device == torch.device(device) else TokenBasis(
            self.mean.to(device), self.rows.to(device), self.scales.to(device))


_COMPACT_FIELDS = array_fields("compact")  # store array -> CompactTargets field


@dataclass(frozen=True)
class CompactTargets:
    """A batch of compact targets as stored (one field per store array), with the coding that reads them."""

    global_target: torch.Tensor  # [B, D] float16
    local_mask: torch.Tensor  # [B, N] float16
    local_codes: torch.Tensor  # [B, N, rank]: int8 (+ local_scale [B, N]) or float16 coefficients
    relation_values: torch.Tensor  # [B, Nc, k or ceil(k / 2)]: the kept entries (`CompactKnobs`)
    coding: "CompactCoding"
    local_scale: torch.Tensor | None = None
    relation_scale: torch.Tensor | None = None  # [B, Nc] of 4- and 8-bit codes
    relation_index: torch.Tensor | None = None  # [B, Nc, k] int16: their columns (k < Nc)
    relation_rest: torch.Tensor | None = None  # [B, Nc] float32: the mass outside them, spread evenly (k < Nc)

    def arrays(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, field) for name, field in _COMPACT_FIELDS.items()
                if getattr(self, field) is not None}

    def to(self, device: torch.device, *, non_blocking: bool = False) -> "CompactTargets":
        moved = {field: getattr(self, field).to(device, non_blocking=non_blocking) for field in _COMPACT_FIELDS.values()
                 if getattr(self, field) is not None}
        return CompactTargets(**moved, coding=self.coding)

    def targets(self) -> Targets:
        """Decoded on the codes' device: local tokens float16 (as a float16 store holds them), relation rows
        float32 (the spread mass of a row may be below float16's range)."""
        knobs, basis = self.coding.knobs, self.coding.basis.to(self.local_codes.device)
        local = basis.decode(dequantize_rows(self.local_codes, self.local_scale), whiten=knobs.token_bits == 8)
        if knobs.relation_bits == 4:
            kept = dequantize_log4(self.relation_values, self.relation_scale, knobs.relation_k)
        elif knobs.relation_bits == 8:
            kept = relation_probabilities(self.relation_values, self.relation_scale)
        else:
            kept = self.relation_values
        if self.relation_index is None:
            return Targets(self.global_target, local.half(), self.local_mask, kept)
        rest = self.relation_rest.float()
        if knobs.relation_bits < 16:  # codes give the kept entries' shape; the rest gives their total
            kept = kept * (1 - rest)[..., None]
        crowd = self.relation_values.shape[-2]
        relation = (rest / (crowd - knobs.relation_k))[..., None].expand(*rest.shape, crowd).contiguous()
        relation.scatter_(-1, self.relation_index.long(), kept.float())
        return Targets(self.global_target, local.half(), self.local_mask, relation)

    def loss_arguments(self) -> dict[str, torch.Tensor]:
        return self.targets().loss_arguments()

    def decoded(self) -> Targets:
        return self.targets().decoded()


@dataclass(frozen=True, eq=False)
class CompactCoding:
    """The knobs and the fitted basis of one compact store: encodes teacher outputs, reads stored arrays."""

    knobs: CompactKnobs
    basis: TokenBasis

    def encode(self, *, global_: torch.Tensor, local: torch.Tensor, mask: torch.Tensor,
               relation: torch.Tensor) -> CompactTargets:
        knobs, basis = self.knobs, self.basis.to(local.device)
        coefficients = basis.encode(local, whiten=knobs.token_bits == 8)
        local_codes, local_scale = quantize_rows(coefficients) if knobs.token_bits == 8 else (coefficients.half(),
                                                                                               None)
        probabilities, index, rest = relation.float(), None, None
        if knobs.relation_k < relation.shape[-1]:
            probabilities, index = probabilities.topk(knobs.relation_k, dim=-1)
            kept = probabilities.sum(-1)
            rest, index = (1 - kept).clamp_min(0), index.to(torch.int16)
            if knobs.relation_bits < 16:  # the codes keep the shape; `rest` the total
                probabilities = probabilities / kept.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        values, relation_scale = {4: quantize_log4, 8: quantize_relation,
                                  16: lambda p: (p.half(), None)}[knobs.relation_bits](probabilities)
        return CompactTargets(global_.half(), mask.half(), local_codes, values, self, local_scale, relation_scale,
                              index, rest)

    def read(self, arrays: dict) -> CompactTargets:
        return CompactTargets(**{field: torch.as_tensor(arrays[name]) for name, field in _COMPACT_FIELDS.items()
                                 if name in arrays}, coding=self)


def encode_targets(*, global_: torch.Tensor, local: torch.Tensor, mask: torch.Tensor, relation: torch.Tensor,
                   target_format: str, compact: CompactCoding | None = None) -> Targets | CompactTargets:
    """Float teacher outputs -> the store's coding (`arrays()` gives what is written)."""
    if target_format == "compact":
        return compact.encode(global_=global_, local=local, mask=mask, relation=relation)
    return Targets.encode(global_=global_, local=local, mask=mask, relation=relation, target_format=target_format)


def read_targets(arrays: dict, compact: CompactCoding | None = None) -> Targets | CompactTargets:
    """Stored arrays of a batch -> what the trainer stages (`.to(device).loss_arguments()`) and verify decodes."""
    return compact.read(arrays) if compact is not None else Targets.from_arrays(arrays)
