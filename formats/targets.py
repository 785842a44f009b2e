"""The target contract: a view set's teacher targets as the store holds them and as the loss takes them.

`Targets` has one field per argument of `dpal.distill.distill_step_losses`; `STORE_ARRAYS` names the store
array each is kept in. The cache stage encodes the teacher's outputs (`Targets.encode`) into the store's
format and writes `arrays()`; the trainer reads the arrays back (`from_arrays`) and passes `loss_arguments()`,
still coded (the loss and the fused kernels decode int8 rows themselves); `verify` compares `decoded()` floats.

Formats (`formats.cli.TARGET_FORMATS`): float16 keeps every target in float16. int8 keeps the global target
and the mask in float16 and codes the local tokens per row (q = round(x / s), s = max|row| / 127) and the
relation rows as log-probability codes (`dpal.losses.quantize_relation`: softmax(q * s) gives the row back),
each with a float32 scale per row.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from dpal.losses import dequantize_rows, quantize_relation, quantize_rows, relation_probabilities
from formats.cli import TARGET_FORMATS

# Targets field (= distill_step_losses argument) -> store array.
STORE_ARRAYS = {"global_target": "global", "local_target": "local", "local_mask": "mask",
                "relation_target": "relation", "local_scale": "local_scale", "relation_scale": "relation_scale"}
VIEW_PARAMS_ARRAY = "view_params"  # the view records, stored beside the targets


def array_dtypes(target_format: str) -> dict[str, str]:
    """Store array -> dtype, for a target format (the int8 row scales exist only in int8 stores)."""
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"unknown target format {target_format!r}; choose one of {', '.join(TARGET_FORMATS)}")
    coded = "int8" if target_format == "int8" else "float16"
    dtypes = {VIEW_PARAMS_ARRAY: "float32", "global": "float16", "local": coded, "mask": "float16",
              "relation": coded}
    if target_format == "int8":
        dtypes.update(local_scale="float32", relation_scale="float32")
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
