"""The L2 -> SM read bandwidth of this GPU, measured: the ceiling `kernels.cost_model` prices L2 traffic at.

A buffer of BUFFER_BYTES (well inside the 50 MB L2 of an H100 or H200) is read PASSES times by PROGRAMS_PER_SM
programs per SM: program p reads, in pass k, the BLOCKS_PER_PROGRAM blocks of program (p + k) mod programs,
so every pass reads the whole buffer once, and every program reads other blocks in each pass. The loads skip
L1 (`.cg`), so every byte comes from L2. The bandwidth is PASSES x the buffer's bytes over the kernel's median
time (`triton.testing.do_bench`, which runs it first to warm up). do_bench clears the L2 before each run, so
the first pass reads from HBM: the figure is low by at most that pass's share. Each program writes one sum
(so that the loads are kept), 4 bytes per program.

`read_pass_sums` runs the kernel anywhere, in Triton's interpreter too (the tests check what it reads);
`l2_read_bytes_per_s` times it on a CUDA device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # float32 values per block: 4 KiB, 8 per thread of 4 warps
BLOCKS_PER_PROGRAM = 4  # independent loads in flight per program
PROGRAMS_PER_SM = 4
PASSES = 64
WARPS = 4


@triton.jit
def _l2_read_kernel(x_ptr, sums_ptr, programs, PASSES: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCKS_PER_PROGRAM: tl.constexpr):
    """sums[p] = sum over passes k of the blocks of program (p + k) mod programs."""
    pid = tl.program_id(0)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(PASSES):
        first = ((pid + k) % programs) * BLOCKS_PER_PROGRAM
        for i in tl.static_range(BLOCKS_PER_PROGRAM):
            offsets = (first + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            total += tl.load(x_ptr + offsets, cache_modifier=".cg")
    tl.store(sums_ptr + pid, tl.sum(total, axis=0))


def buffer_for(programs: int, device) -> torch.Tensor:
    """The float32 buffer `programs` programs read: BLOCKS_PER_PROGRAM blocks each."""
    return torch.ones(programs * BLOCKS_PER_PROGRAM * BLOCK, dtype=torch.float32, device=device)


def read_pass_sums(x: torch.Tensor, programs: int, passes: int = PASSES) -> torch.Tensor:
    """One run of the probe over `x` (from `buffer_for(programs)`): each program's sum of what it read."""
    sums = torch.empty(programs, dtype=torch.float32, device=x.device)
    _l2_read_kernel[(programs,)](x, sums, programs, PASSES=passes, BLOCK=BLOCK,
                                 BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM, num_warps=WARPS)
    return sums


def l2_read_bytes_per_s(device) -> dict:
    """The probe on a CUDA device: {"l2_gbps", "l2" (what was read), "sms"}."""
    import triton.testing

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = PROGRAMS_PER_SM * sms
    x = buffer_for(programs, device)
    ms = triton.testing.do_bench(lambda: read_pass_sums(x, programs), return_mode="median")
    return {"l2_gbps": PASSES * x.nbytes / (ms / 1e3) / 1e9, "sms": sms,
            "l2": f"{x.nbytes / 2 ** 20:.1f} MiB read {PASSES} times by {programs} programs"}
