"""What every fused op shares: the interpreter choice, input checks, dot precision.

Triton decides when it is imported, and at `@triton.jit` time, whether kernels are compiled or interpreted, from
TRITON_INTERPRET. This module only reads that choice; entry points make it before triton is imported
(`kernels.select_interpreter`). Interpreted, the kernels run (slowly, exactly) on CPU tensors; compiled, on CUDA
tensors; `check_device` refuses the other pairings in one line.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.interpreter import interpreter_selected

INTERPRETED = interpreter_selected()

# The GPU the kernels' pinned configurations are compiled and checked for (`make check-sm90`).
SUPPORTED_CAPABILITY = (9, 0)
# The torch.library namespace of the fused ops (`torch.ops.dpal_fused.*`): each op's forward and backward are
# custom ops with fake (shape-only) implementations and autograd registered, so torch.compile traces the model
# around them without a graph break and calls them as they are.
NAMESPACE = "dpal_fused"
# tl.dot input precision of every launch (see `dot_operands`).
DOT_PRECISION = "ieee"
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
    if first.type != ("cpu" if INTERPRETED else "cuda"):
        runs_on = ("interpreted (TRITON_INTERPRET=1), so it runs on CPU tensors" if INTERPRETED else
                   "compiled, so it runs on CUDA tensors (CPU tensors need TRITON_INTERPRET=1)")
        raise ValueError(f"{op}: tensors are on {first}, but the fused op is {runs_on}; choose with "
                         "kernels.select_interpreter() before triton is imported, or run the dpal reference")
    return first


def check_capability(op: str, device: torch.device) -> None:
    """A CUDA device is one the pinned configurations are for. Called inside the custom ops, where it runs
    eagerly even under torch.compile (which cannot trace a device query)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) != SUPPORTED_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"{op}: {device} is {torch.cuda.get_device_name(device)} (sm_{major}{minor}); the kernels' "
                         f"configurations are pinned and checked for sm_90 (H100, H200) only: run the reference "
                         f"there (--reference-path, or DPAL_FORCE_REFERENCE=1)")


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


@triton.jit
def _special_function(x, exact, PTX: tl.constexpr, INTERPRETED: tl.constexpr):
    """One approximate special-function-unit instruction (PTX, e.g. "ex2.approx.ftz.f32") on fp32 x, a single
    MUFU in SASS where Triton's own lowering adds range fix-ups or, for 1 / x, an IEEE division with a slow
    path. The interpreter returns `exact` (dead code when compiled)."""
    if INTERPRETED:
        y = exact
    else:
        y = tl.inline_asm_elementwise(PTX + " $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    return y


@triton.jit
def fast_rcp(x, INTERPRETED: tl.constexpr):
    """1 / x for fp32 x > 0 (rcp.approx.ftz: within 1 ulp)."""
    return _special_function(x, 1.0 / x, "rcp.approx.ftz.f32", INTERPRETED)


@triton.jit
def fast_exp2(x, INTERPRETED: tl.constexpr):
    """2^x for fp32 x (ex2.approx.ftz: within 2 ulp, results below 2^-126 flushed to 0)."""
    return _special_function(x, tl.exp2(x), "ex2.approx.ftz.f32", INTERPRETED)


@triton.jit
def fast_log2(x, INTERPRETED: tl.constexpr):
    """log2 x for fp32 x >= 2^-126 (lg2.approx.ftz: within 2^-22 absolute)."""
    return _special_function(x, tl.log2(x), "lg2.approx.ftz.f32", INTERPRETED)


def dot_operands(dtype: torch.dtype) -> str:
    """What the kernels' dots run on for inputs of `dtype` (a key of the pinned-config tables): "bf16" or
    "fp16" (tensor cores) or "fp32" (IEEE dots on the FMA units: float32 inputs are multiplied in full float32
    whatever torch's process-wide TF32 setting says, so that a launch's code depends on its inputs only, never
    on a global another thread may change while the step runs; training runs the kernels under bf16 autocast)."""
    check_dtype("fused kernels", "input", torch.empty((), dtype=dtype))
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def multiprocessors(device: torch.device) -> int | None:
    """SM count of a CUDA device; None for the interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def resident_programs(num_warps: int) -> int:
    """Programs of a tensor-core kernel an SM holds at once: their fp32 accumulators take 128 or more registers
    per thread, so one 8-warp or two 4-warp programs."""
    return 2 if num_warps <= 4 else 1


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes (constexprs), warps and pipeline stages of one kernel launch.

    Every op pins its configs per shape and dtype in a table (no autotuning): the same inputs run the same
    code, hence the same summation order, on every rank and on every resume. Each shipped config is
    compiled for sm_90 by the sweep (`kernels.sweep`, `make check-sm90`): no spills, and warpgroup MMAs
    (wgmma) wherever its dots can use tensor cores.
    """
    tiles: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    @classmethod
    def of(cls, num_warps: int, num_stages: int, **tiles: int) -> "KernelConfig":
        return cls(tuple(tiles.items()), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.tiles)[name]

    def with_tiles(self, **tiles: int) -> "KernelConfig":
        """This config with `tiles` set: a tile it has takes the new value in place, a new one comes last."""
        kept = tuple((name, tiles.pop(name, value)) for name, value in self.tiles)
        return KernelConfig(kept + tuple(tiles.items()), self.num_warps, self.num_stages)

    @property
    def label(self) -> str:
        """E.g. "B64 K64 M64 hold_queries w4 s2": each BLOCK_X tile, the switches that are on (other
        constexprs, 0 or 1), then warps and pipeline stages."""
        tiles = " ".join(f"{name.removeprefix('BLOCK_')}{value}" if name.startswith("BLOCK_") else name.lower()
                         for name, value in self.tiles if name.startswith("BLOCK_") or value)
        return f"{tiles} w{self.num_warps} s{self.num_stages}"


def kernel_name(kernel) -> str:
    """A @triton.jit kernel's name in tables and plans: `_expert_grad_kernel` -> `expert_grad` (compiled or
    interpreted alike: both wrap the Python function as `.fn`)."""
    return kernel.fn.__name__.strip("_").removesuffix("_kernel")


@dataclass(frozen=True)
class PlannedLaunch:
    """One kernel launch of a fused op, planned from shapes and dtypes alone: the op issues it (`planned(**tensors)`)
    and the sm_90 compile sweep compiles it (`kernels.sweep`), so both see the same kernel, grid, config and
    arguments. `tensors` names each tensor argument's dtype; `scalars` holds the other arguments and the
    constexprs beyond the config's tiles; `part` says which piece of the call it is (e.g. "du[0:]"), for tables."""
    kernel: object
    grid: tuple[int, ...]
    config: KernelConfig
    tensors: dict
    scalars: dict
    part: str = ""

    @property
    def kernel_name(self) -> str:
        return kernel_name(self.kernel)

    def __call__(self, **tensors: torch.Tensor) -> None:
        self.kernel[self.grid](**tensors, **self.scalars, **dict(self.config.tiles),
                               num_warps=self.config.num_warps, num_stages=self.config.num_stages)
