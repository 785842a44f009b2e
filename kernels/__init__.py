"""Fused Triton ops (one per file), each matching a `dpal` reference; `python -m kernels.bench` times them.

The method never imports this package, and importing it has no side effect; two explicit calls do the rest:
- `select_interpreter()`, made by every entry point (the CLIs, the test session) before anything imports
  triton (timm does): compiled kernels for CUDA tensors, or Triton's interpreter for CPU tensors;
- `register()`, made by the trainer and its bench: the fused ops become what `dpal`'s ops run on CUDA tensors.
Importing the package itself imports neither triton nor a kernel.
"""
from __future__ import annotations

import os
import sys

INTERPRET_VARIABLE = "TRITON_INTERPRET"  # Triton's own switch, read when triton and each kernel are defined


def interpreter_selected() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter (as Triton reads it: 1/true/yes/on)."""
    return os.environ.get(INTERPRET_VARIABLE, "0").strip().lower() in ("1", "true", "yes", "on", "y")


def select_interpreter(interpret: bool | None = None) -> bool:
    """Choose how the kernels run, before triton is imported; returns the choice.

    True: Triton's interpreter (CPU tensors, slow, exact); False: compiled (CUDA tensors). None keeps a
    TRITON_INTERPRET already in the environment (the user's or a parent process's choice) and otherwise takes
    the interpreter exactly when no CUDA device is visible. Once triton is imported its kernels are defined
    one way or the other, so a different choice then raises instead of silently not applying.
    """
    if interpret is None:
        if INTERPRET_VARIABLE in os.environ:
            interpret = interpreter_selected()
        else:
            import torch  # torch does not import triton
            interpret = not torch.cuda.is_available()
    if "triton" in sys.modules and interpret != interpreter_selected():
        raise RuntimeError(f"triton is already imported with {INTERPRET_VARIABLE}="
                           f"{os.environ.get(INTERPRET_VARIABLE, '(unset)')}, so the kernels can no longer be made "
                           f"{'interpreted' if interpret else 'compiled'}: call kernels.select_interpreter() "
                           f"before anything imports triton (timm does), or set {INTERPRET_VARIABLE} before "
                           "starting Python")
    os.environ[INTERPRET_VARIABLE] = "1" if interpret else "0"
    return interpret


def register() -> None:
    """Make the fused ops what `dpal.decoder.expert_path` and `dpal.losses.relation_kl` run on CUDA tensors
    (other devices keep the references; `dpal.dispatch.force_reference` still overrides)."""
    from dpal.decoder import expert_path
    from dpal.losses import relation_kl
    from kernels import decoder_experts, relation_loss

    expert_path.register("cuda", decoder_experts.expert_path)
    relation_kl.register("cuda", relation_loss.relation_kl)
