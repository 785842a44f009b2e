"""What every fused op shares: interpreter setup on machines without CUDA, input checks, dot precision.

Triton decides at `@triton.jit` time whether a kernel is compiled or interpreted, from TRITON_INTERPRET;
this module is imported by `kernels/__init__.py` before any kernel module is, so on a CPU-only machine the
kernels run (slowly, exactly) in Triton's interpreter on CPU tensors instead of failing to compile.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        # Its kernels (tl.zeros included) were already built for compilation, which cannot run here.
        raise ImportError("triton was imported (e.g. by timm) before `kernels` on a machine without CUDA, so "
                          "Triton's interpreter can no longer be selected: import kernels first, or set "
                          "TRITON_INTERPRET=1 before starting Python")
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (after the interpreter choice above)
import triton.language as tl  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Tensor-core inputs the kernels accept; float64 has no tensor-core path (use the dpal reference).
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and that device one the kernels can run on (CUDA, or CPU when interpreted)."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"{op}: inputs are on different devices: "
                         + ", ".join(f"{n}={d}" for n, d in devices.items()))
    if first.type != "cuda" and not (INTERPRETED and first.type == "cpu"):
        raise ValueError(f"{op}: tensors are on {first}; the fused op runs on CUDA tensors (or on CPU "
                         "tensors under TRITON_INTERPRET=1); use the dpal reference via dpal.dispatch elsewhere")
    return first


def check_dtype(op: str, name: str, tensor: torch.Tensor, allowed=COMPUTE_DTYPES) -> None:
    if tensor.dtype not in allowed:
        raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; supported: {_dtype_names(allowed)}")


def check_shape(op: str, name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (set only when interpreted): Triton 3.8's interpreter multiplies bfloat16 tiles
    as their raw uint16 bits, so operands go to float32 first; bf16/fp16 products are exact in float32,
    so this matches the tensor-core result up to summation order. Compiled kernels never take it."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 inputs follow torch's TF32 switch, like the cuBLAS GEMMs beside them."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def num_programs_for_rows(n_rows: int, device: torch.device) -> int:
    """Persistent-style grid for row reductions: a few programs per SM on a GPU, a handful when interpreted."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))


def compile_for_gpu(kernel, arg_types: dict[str, str], constexprs: dict, *, arch: int = 90, config_index: int = 0):
    """Compile a kernel to a cubin for CUDA sm_<arch> with Triton's compiler and ptxas; no GPU needed.

    For an autotuned kernel, config `config_index` supplies its tile constexprs, warps and stages.
    `arg_types` maps each runtime argument to a Triton type ('*bf16', 'i32', 'fp32', ...). The kernel
    must have been defined with TRITON_INTERPRET unset or 0 (interpreted kernels have no IR to lower).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    configs = getattr(kernel, "configs", None)
    fn = kernel.fn if configs is not None else kernel
    if not isinstance(fn, JITFunction):
        raise RuntimeError("kernel was defined under TRITON_INTERPRET=1; compile it in a process with "
                           "TRITON_INTERPRET=0")
    constexprs, options = dict(constexprs), {}
    if configs is not None:
        config = configs[config_index]
        constexprs.update(config.kwargs)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    signature = {name: "constexpr" if name in constexprs else arg_types[name] for name in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                          options=options)
