"""One place that chooses between the plain-PyTorch references and the fused Triton kernels.

The decoder and the training step call `expert_path` / `relation_kl` here, never a kernel directly,
so that numerics can always be checked against the reference by one switch:
`force_reference(True)` or the environment variable DPAL_FORCE_REFERENCE=1.
"""
from __future__ import annotations

import os

import torch

# Module imports (not names) because dpal.decoder imports this module: the cycle resolves at call time.
from dpal import decoder, losses

_force_reference = os.environ.get("DPAL_FORCE_REFERENCE", "0") not in ("", "0")


def force_reference(enabled: bool) -> None:
    """Route every dispatched op to its plain-PyTorch reference (True) or let the dispatcher choose."""
    global _force_reference
    _force_reference = bool(enabled)


def reference_forced() -> bool:
    return _force_reference


def expert_path(queries: torch.Tensor, scores: torch.Tensor, h: torch.Tensor,
                expert_weight: torch.Tensor, expert_bias: torch.Tensor,
                expert_norm_weight: torch.Tensor, expert_norm_bias: torch.Tensor,
                out_norm_weight: torch.Tensor, out_norm_bias: torch.Tensor, *,
                mix_divisor: float = 256.0, experts_loss_weight: float = 0.025,
                eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder expert path; same contract as `dpal.decoder.expert_path_reference`.

    CUDA tensors go to the fused Triton op (`kernels.decoder_experts`), which raises, naming the input,
    on a dtype or shape it does not support rather than silently changing numerics; others to the reference.
    """
    implementation = decoder.expert_path_reference
    if queries.is_cuda and not _force_reference:
        from kernels import decoder_experts  # Triton is only needed (and imported) on the CUDA path
        implementation = decoder_experts.expert_path
    return implementation(queries, scores, h, expert_weight, expert_bias, expert_norm_weight, expert_norm_bias,
                          out_norm_weight, out_norm_bias, mix_divisor=mix_divisor,
                          experts_loss_weight=experts_loss_weight, eps=eps)


def relation_kl(y: torch.Tensor, target: torch.Tensor,
                target_row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Relation KL loss; same contract as `dpal.losses.relation_kl_reference`.

    CUDA tensors go to the fused Triton op (`kernels.relation_loss`), others to the reference.
    """
    if y.is_cuda and not _force_reference:
        from kernels import relation_loss  # Triton is only needed (and imported) on the CUDA path
        return relation_loss.relation_kl(y, target, target_row_scale)
    return losses.relation_kl_reference(y, target, target_row_scale)
