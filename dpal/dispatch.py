"""The method's op table: each hot op is defined by its plain-PyTorch reference, and faster implementations
may be registered for it per device type by a package above `dpal` (`kernels.register()` plugs in the fused
Triton ops for CUDA tensors). `dpal` never imports them: without a registration every op runs its reference.

The module that owns a reference makes the op (`expert_path = Op("expert_path", expert_path_reference)` in
`dpal.decoder`, `relation_kl` in `dpal.losses`); callers call the op, never an implementation directly, so
numerics can always be checked against the reference by one switch: `force_reference(True)` or the environment
variable DPAL_FORCE_REFERENCE=1.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

_force_reference = os.environ.get("DPAL_FORCE_REFERENCE", "0") not in ("", "0")


def force_reference(enabled: bool) -> None:
    """Route every op to its plain-PyTorch reference (True) or to what is registered for the inputs' device."""
    global _force_reference
    _force_reference = bool(enabled)


def reference_forced() -> bool:
    return _force_reference


class Op:
    """A named op of the method: its reference (the definition and the default) and, per device type, the
    implementation registered for it. Called like the reference; the first argument's device picks."""

    def __init__(self, name: str, reference: Callable):
        self.reference = reference
        self.implementations: dict[str, Callable] = {}  # device type ("cuda", ...) -> implementation
        functools.update_wrapper(self, reference)  # the reference's docstring and signature
        self.__name__ = self.__qualname__ = name

    def register(self, device_type: str, implementation: Callable) -> None:
        """Run `implementation` (same contract as the reference) for inputs on `device_type` from now on."""
        self.implementations[device_type] = implementation

    def implementation(self, device: torch.device) -> Callable:
        """What a call with inputs on `device` runs."""
        if _force_reference:
            return self.reference
        return self.implementations.get(device.type, self.reference)

    def __call__(self, first: torch.Tensor, *args, **kwargs):
        return self.implementation(first.device)(first, *args, **kwargs)

    def __repr__(self) -> str:
        registered = ", ".join(f"{d}: {f.__module__}.{f.__qualname__}" for d, f in self.implementations.items())
        return f"Op({self.__name__!r}, reference={self.reference.__qualname__}, registered={{{registered}}})"
