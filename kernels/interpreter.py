"""The one choice of how Triton kernels run: compiled (CUDA tensors) or interpreted (CPU tensors).

Triton reads TRITON_INTERPRET when it is imported and when each kernel is defined, so entry points choose here
before anything imports triton (timm does); `kernels._common` only reads the choice.
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
