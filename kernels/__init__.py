"""Fused Triton ops (one per file), each matching a `dpal` reference; `python -m kernels.bench` times them.

The method never imports this package, and importing it has no side effect; two explicit calls do the rest:
- `select_interpreter()`, made by every entry point (the CLIs, the test session) before anything imports
  triton (timm does): compiled kernels for CUDA tensors, or Triton's interpreter for CPU tensors;
- `register()`, made by the trainer and its bench: the fused ops become what `dpal`'s ops run on CUDA tensors.
Importing the package itself imports neither triton nor a kernel.
"""
from __future__ import annotations

from kernels.interpreter import INTERPRET_VARIABLE, interpreter_selected, select_interpreter

__all__ = ["INTERPRET_VARIABLE", "interpreter_selected", "register", "select_interpreter"]


def register() -> None:
    """Make the fused ops what `dpal.decoder.expert_path` and `dpal.losses.relation_kl` run on CUDA tensors
    (other devices keep the references; `dpal.dispatch.force_reference` still overrides)."""
    from dpal.decoder import expert_path
    from dpal.losses import relation_kl
    from kernels import decoder_experts, relation_loss

    expert_path.register("cuda", decoder_experts.expert_path)
    relation_kl.register("cuda", relation_loss.relation_kl)
