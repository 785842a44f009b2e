"""Fused Triton ops (one per file), each matching a `dpal` reference; `python -m kernels.bench` times them.

`kernels._common` is imported first: it selects Triton's interpreter when CUDA is absent, which must
happen before any `@triton.jit` kernel is defined.
"""
from kernels import _common  # noqa: F401  (side effect: interpreter selection, see above)
