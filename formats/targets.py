"""The target contract: a view set's teacher targets as the store holds them and as the loss takes them.

`Targets` has one field per argument of `dpal.distill.distill_step_losses`; `STORE_ARRAYS` names the store
array each is kept in. The cache stage encodes the teacher's outputs (`Targets.encode`) into the store's
format and writes `arrays()`; the trainer reads the arrays back (`from_arrays`) and passes `loss_arguments()`,
still coded (the loss and the fused kernels decode int8 rows themselves); `verify` compares `decoded()` floats.

Formats (`formats.cli.TARGET_FORMATS`): float16 keeps every target in float16. int8 keeps the global target
and the mask in float16 and codes the local tokens per row (q = round(x / s), s = max|row| / 127) and the
relation rows as log-probability codes (`dpal.losses.quantize_relation`: softmax(q * s) gives the row back),
each with a float32 scale per row. compact (`CompactCoding`, docs/stores.md) keeps the global target and
the mask in float16, the local tokens as coefficients on a low-rank basis fitted once per store (`TokenBasis`,
kept beside the arrays) and the relation rows as their top-k entries plus the mass of the others; knobs
`CompactKnobs` (rank, k, bits: 8 codes values like int8, 16 keeps float16). A compact batch is decoded by
`CompactTargets.loss_arguments()` on whatever device it sits on: the trainer stages it on the training device,
so the step takes the same float targets as from a float16 store.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from dpal.losses import dequantize_rows, quantize_relation, quantize_rows, relation_probabilities
from formats.cli import CODE_BITS, TARGET_FORMATS

# Targets field (= distill_step_losses argument) -> store array.
STORE_ARRAYS = {"global_target": "global", "local_target": "local", "local_mask": "mask",
                "relation_target": "relation", "local_scale": "local_scale", "relation_scale": "relation_scale"}
VIEW_PARAMS_ARRAY = "view_params"  # the view records, stored beside the targets
# compact stores: `local` holds basis coefficients [N, rank], `relation` the top-k values [Nc, k], and these
# arrays the kept entries' columns and the mass of the others.
RELATION_INDEX_ARRAY, RELATION_REST_ARRAY = "relation_index", "relation_rest"


def array_dtypes(target_format: str, bits: int = 8) -> dict[str, str]:
    """Store array -> dtype, for a target format (row scales exist where values are int8 codes; `bits` applies
    to compact stores)."""
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"unknown target format {target_format!r}; choose one of {', '.join(TARGET_FORMATS)}")
    quantized = target_format == "int8" or (target_format == "compact" and bits == 8)
    coded = "int8" if quantized else "float16"
    dtypes = {VIEW_PARAMS_ARRAY: "float32", "global": "float16", "local": coded, "mask": "float16",
              "relation": coded}
    if quantized:
        dtypes.update(local_scale="float32", relation_scale="float32")
    if target_format == "compact":
        dtypes.update({RELATION_INDEX_ARRAY: "int16", RELATION_REST_ARRAY: "float32"})
    return dtypes


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
        array_dtypes(target_format)  # refuses an unknown format
        if target_format == "int8":
            (local, local_scale), (relation, relation_scale) = quantize_rows(local), quantize_relation(relation)
        else:
            local, relation, local_scale, relation_scale = local.half(), relation.half(), None, None
        return cls(global_.half(), local, mask.half(), relation, local_scale, relation_scale)

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor | np.ndarray]) -> "Targets":
        """Store arrays (names as `STORE_ARRAYS`; others, such as the view records, ignored) -> Targets."""
        return cls(**{field: torch.as_tensor(arrays[name]) for field, name in STORE_ARRAYS.items() if name in arrays})

    def arrays(self) -> dict[str, torch.Tensor]:
        """The store arrays holding these targets (no entry for an absent scale)."""
        return {STORE_ARRAYS[name]: value for name, value in self.loss_arguments().items()}

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


@dataclass(frozen=True)
class CompactKnobs:
    """What a compact store keeps: `token_rank` basis directions per local token, the `relation_k` largest
    entries of each relation row, values in `bits` (8: int8 codes with a scale per row, 16: float16). At
    rank = width, k = crowd tokens, bits = 16 nothing is dropped (float16 rounding only)."""

    token_rank: int
    relation_k: int
    bits: int

    def problem(self, *, width: int, crowd_tokens: int) -> str | None:
        """None, or one line naming the knob out of range and the range accepted for this teacher."""
        if not 1 <= self.token_rank <= width:
            return f"token rank {self.token_rank} is out of range: must be 1..{width} (the teacher's token width)"
        if not 1 <= self.relation_k <= crowd_tokens:
            return (f"relation k {self.relation_k} is out of range: must be 1..{crowd_tokens} (the crowd view's "
                    f"token count)")
        if self.bits not in CODE_BITS:
            return f"code bits {self.bits} is not accepted: choose one of {', '.join(map(str, CODE_BITS))}"
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)  # tensor fields
class TokenBasis:
    """Principal directions of teacher patch tokens (largest variance first), fitted on the calibration
    images as the shape mask is: a token x is kept as c = (x - mean) @ rows^T and read as mean + c @ rows."""

    mean: torch.Tensor  # [D] float32
    rows: torch.Tensor  # [rank, D] float32, orthonormal

    @classmethod
    def fit(cls, tokens: torch.Tensor, rank: int) -> "TokenBasis":
        """Fit on tokens [..., D] (any leading shape), in float64."""
        flat = tokens.reshape(-1, tokens.shape[-1]).double()
        mean = flat.mean(0)
        centred = flat - mean
        _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        return cls(mean.float(), vectors.flip(-1)[:, :rank].T.contiguous().float())

    def array(self) -> np.ndarray:
        """[1 + rank, D] float32: the mean, then the directions (how the store keeps it)."""
        return torch.cat([self.mean[None], self.rows]).numpy()

    @classmethod
    def from_array(cls, array: np.ndarray) -> "TokenBasis":
        values = torch.as_tensor(np.asarray(array, dtype=np.float32))
        return cls(values[0].contiguous(), values[1:].contiguous())

    def to(self, device: torch.device) -> "TokenBasis":
        return self if self.rows.device == torch.device(device) else TokenBasis(self.mean.to(device),
                                                                                 self.rows.to(device))


@dataclass(frozen=True)
class CompactTargets:
    """A batch of compact targets as stored (names as the store arrays), with the basis that reads them."""

    global_target: torch.Tensor  # [B, D] float16
    local_mask: torch.Tensor  # [B, N] float16
    local_codes: torch.Tensor  # [B, N, rank] int8 (+ local_scale [B, N]) or float16
    relation_values: torch.Tensor  # [B, Nc, k]: int8 log-domain codes of the kept entries (+ relation_scale)
    relation_index: torch.Tensor  # [B, Nc, k] int16: their columns
    relation_rest: torch.Tensor  # [B, Nc] float32: the row's mass outside them, spread evenly when read
    basis: TokenBasis
    local_scale: torch.Tensor | None = None
    relation_scale: torch.Tensor | None = None

    _ARRAYS = {"global_target": "global", "local_mask": "mask", "local_codes": "local", "relation_values": "relation",
               "relation_index": RELATION_INDEX_ARRAY, "relation_rest": RELATION_REST_ARRAY,
               "local_scale": "local_scale", "relation_scale": "relation_scale"}

    def arrays(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, field) for field, name in self._ARRAYS.items() if getattr(self, field) is not None}

    @classmethod
    def from_arrays(cls, arrays: dict, basis: TokenBasis) -> "CompactTargets":
        return cls(**{field: torch.as_tensor(arrays[name]) for field, name in cls._ARRAYS.items() if name in arrays},
                   basis=basis)

    def to(self, device: torch.device, *, non_blocking: bool = False) -> "CompactTargets":
        moved = {field: getattr(self, field).to(device, non_blocking=non_blocking) for field in self._ARRAYS
                 if getattr(self, field) is not None}
        return CompactTargets(**moved, basis=self.basis.to(device))

    def targets(self) -> Targets:
        """Decoded on the codes' device: local tokens float16 (as a float16 store holds them), relation rows
        float32 (the spread mass of a row may be below float16's range)."""
        basis = self.basis.to(self.local_codes.device)
        local = basis.mean + dequantize_rows(self.local_codes, self.local_scale) @ basis.rows
        kept = 1 - self.relation_rest.float()
        if self.relation_values.dtype == torch.int8:
            top = relation_probabilities(self.relation_values, self.relation_scale) * kept[..., None]
        else:
            top = self.relation_values.float()
        crowd, k = self.relation_values.shape[-2], self.relation_values.shape[-1]
        spread = self.relation_rest.float() / (crowd - k) if crowd > k else torch.zeros_like(kept)
        relation = spread[..., None].expand(*spread.shape, crowd).contiguous()
        relation.scatter_(-1, self.relation_index.long(), top)
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
        basis = self.basis.to(local.device)
        coefficients = (local.float() - basis.mean) @ basis.rows.T
        probabilities = relation.float()
        values, index = probabilities.topk(self.knobs.relation_k, dim=-1)
        kept = values.sum(-1)
        local_scale = relation_scale = None
        if self.knobs.bits == 8:
            codes, local_scale = quantize_rows(coefficients)
            values, relation_scale = quantize_relation(values / kept.clamp_min(torch.finfo(torch.float32).tiny)[..., None])
        else:
            codes, values = coefficients.half(), values.half()
        return CompactTargets(global_.half(), mask.half(), codes, values, index.to(torch.int16),
                              (1 - kept).clamp_min(0), self.basis, local_scale, relation_scale)

    def read(self, arrays: dict) -> CompactTargets:
        return CompactTargets.from_arrays(arrays, self.basis)


def encode_targets(*, global_: torch.Tensor, local: torch.Tensor, mask: torch.Tensor, relation: torch.Tensor,
                   target_format: str, compact: CompactCoding | None = None) -> Targets | CompactTargets:
    """Float teacher outputs -> the store's coding (`arrays()` gives what is written)."""
    if target_format == "compact":
        return compact.encode(global_=global_, local=local, mask=mask, relation=relation)
    return Targets.encode(global_=global_, local=local, mask=mask, relation=relation, target_format=target_format)


def read_targets(arrays: dict, compact: CompactCoding | None = None) -> Targets | CompactTargets:
    """Stored arrays of a batch -> what the trainer stages (`.to(device).loss_arguments()`) and verify decodes."""
    return compact.read(arrays) if compact is not None else Targets.from_arrays(arrays)
