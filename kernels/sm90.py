"""What a kernel launch becomes on an H100/H200 (sm_90), read without a GPU.

`compile_launch` compiles one launch exactly as Triton's JIT would for it on an sm_90 device: the same
binder turns the launch's arguments (pointer dtypes, integer values, constexprs, warps, stages) into the
signature and the specialisation attributes (16-divisible integers and pointers, integers equal to 1),
then `triton.compile` lowers it through ptxas. `cubin_facts` reads the cubin with the tools Triton ships
(`cuobjdump`, `nvdisasm`): registers, stack frame, local-memory instructions (register spills show up as
STL/LDL), warpgroup MMAs (HGMMA, what Hopper's tensor cores run at full rate) and the older HMMA.

`sweep` compiles many launches (listed by `kernels.sweep`) in forked children, two at a time by default, so that a compiler crash
(Triton asserts abort the process) becomes one failed row instead of ending the sweep.

The kernels must have been defined compiled, i.e. in a process with TRITON_INTERPRET=0; `python -m
kernels.sm90` and the tests start such a process.
"""
from __future__ import annotations

import multiprocessing
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton

from kernels._common import kernel_name

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ARCH = 90


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the op issues it: runtime arguments by name (a torch.dtype stands for a
    tensor of that dtype, 16-byte aligned as torch allocates them; ints and floats are passed as such),
    the constexprs (tiles from the pinned config, dtype switches) and the launch options."""
    op: str
    kernel: object  # a @triton.jit function defined with TRITON_INTERPRET=0
    args: dict
    num_warps: int
    num_stages: int
    config: str  # the config's label, for tables
    case: str  # what the arguments stand for (shape, dtypes), for tables
    tensor_core: bool  # the kernel's dots can run on tensor cores (bf16/fp16, or fp32 as tf32)
    programs: int = 1  # grid size, for executed-instruction estimates

    @property
    def kernel_name(self) -> str:
        return kernel_name(self.kernel)


@dataclass
class CubinFacts:
    registers: int
    stack_bytes: int
    local_loads: int  # LDL in SASS: a spilled register (or a register array indexed at run time) read back
    local_stores: int  # STL
    hgmma: int  # warpgroup MMA instructions (sm_90 tensor cores at full rate)
    hmma: int  # warp-level mma.sync instructions (the pre-Hopper path)
    instructions: int  # SASS instructions in the kernel, static count
    shared_bytes: int
    counts: dict = field(default_factory=dict)  # SASS opcode -> static count
    # Static counts per loop nest, for executed counts: a loop is a backward branch of the SASS, loops are
    # numbered in code order (an outer loop before the loops inside it), and an instruction's nest is the
    # comma-joined numbers of the loops around it ("" outside every loop). Per nest: instructions, MUFU
    # instructions (the special-function unit: 16 lanes per clock per SM, an eighth of the issue rate), and
    # the tensor cores' FLOPs by input type (HGMMA.MxNxK: 2MNK per warpgroup, issued by each of its 4 warps,
    # so a quarter per warp instruction; HMMA.MNK: 2MNK per warp), and the global-memory bytes of one warp's
    # instructions by kind (`global_access`; for "uncounted", the number of instructions).
    loop_nests: dict = field(default_factory=dict)
    hgmma_shapes: dict = field(default_factory=dict)  # "MxNxK" of the HGMMA instructions -> static count

    @property
    def spills(self) -> int:
        return self.local_loads + self.local_stores


def _placeholder(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(16, dtype=dtype)  # only its dtype and (aligned) address are looked at


def _bind(launch: Launch):
    """The JIT's view of `launch`: (function, backend, target, signature, constexprs, attrs, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = launch.kernel
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{launch.kernel_name} was defined under TRITON_INTERPRET=1; compile it in a process "
                           "with TRITON_INTERPRET=0")
    target = GPUTarget("cuda", ARCH, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = {k: _placeholder(v) if isinstance(v, torch.dtype) else v for k, v in launch.args.items()}
    options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, specialization, parsed = binder(**args, **options)
    return fn, backend, target, specialization, fn._pack_args(backend, options, bound, specialization, parsed)


def specialization_key(launch: Launch) -> tuple:
    """Equal for launches the JIT compiles to the same binary (dtypes, integer specialisation, constexprs)."""
    fn, _, _, specialization, (options, *_) = _bind(launch)
    return fn.__name__, tuple(map(str, specialization)), options.num_warps, options.num_stages


def compile_launch(launch: Launch):
    """triton.compile of `launch` for sm_90 with the JIT's own specialisation of its arguments."""
    from triton.compiler import ASTSource

    fn, _, target, _, (options, signature, constexprs, attrs) = _bind(launch)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _tool(name: str, *args: str) -> str:
    return subprocess.run([str(TOOLS / name), *args], check=True, capture_output=True, text=True).stdout


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32\.(BF16|F16|TF32)")
_HMMA = re.compile(r"HMMA\.(\d)(\d)(\d+)\.F32\.(BF16|F16|TF32)")


def _mma_flops(line: str) -> tuple[str, float] | None:
    """(input type, FLOPs per warp instruction) of an HGMMA or HMMA line, else None."""
    if (m := _HGMMA.search(line)) is not None:
        return m.group(4), 2.0 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) / 4  # one warp's quarter
    if (m := _HMMA.search(line)) is not None:
        return m.group(4), 2.0 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    return None


# Global-memory instructions: loads, cp.async copies into shared memory, stores, reductions and atomics.
_GLOBAL = re.compile(r"\s((?:LDG|LDGSTS|STG|RED|ATOMG)(?:\.[A-Z0-9_]+)*)\s+(.*);")
_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}  # bytes per lane; no width suffix: 4
# Copies whose bytes the SASS does not say: the tensor memory accelerator's (their box lives in a tensor map)
# and bulk copies.
_UNCOUNTED = re.compile(r"\s(UTMALDG|UTMASTG|UBLKCP|UBLKRED)[\s.]")
GLOBAL_KINDS = ("load", "copy", "copy_bypass", "store", "uncounted")


def global_access(line: str) -> tuple[str, int] | None:
    """(kind, bytes one warp instruction moves: 32 lanes x its width) of a global-memory instruction, else None.
    Kinds: "load" (LDG, through L1: replicated loads of a program may hit there), "copy" (cp.async, LDGSTS,
    through L1), "copy_bypass" (LDGSTS.BYPASS, cp.async.cg: skips L1, so every byte comes from L2), "store"
    (STG, RED, ATOMG: always reach L2), "uncounted" (a TMA or bulk copy, 0 bytes here: its size is in its
    tensor map). Every lane counts, so a lane masked off at run time (a ragged tile's edge) counts as if it
    moved its bytes; a cp.async whose source predicate is the constant false (`!PT`: a pipeline stage past the
    last iteration of an unrolled loop, which only zero-fills shared memory) moves nothing."""
    if _UNCOUNTED.search(line):
        return "uncounted", 0
    found = _GLOBAL.search(line)
    if found is None:
        return None
    opcode, operands = found.groups()
    width = 32 * next((_WIDTHS[part] for part in opcode.split(".")[1:] if part in _WIDTHS), 4)
    if opcode.startswith("LDGSTS"):
        moved = 0 if operands.replace(" ", "").endswith(",!PT") else width
        return ("copy_bypass" if ".BYPASS" in opcode else "copy"), moved
    return ("load" if opcode.startswith("LDG") else "store"), width


def _loop_nests(sass: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(opcode, numbers of the loops around it, line) of every SASS instruction; see CubinFacts.loop_nests."""
    labels, loops, lines = {}, [], []
    for line in sass.splitlines():
        if (label := _LABEL.match(line.strip())) is not None:
            labels[label.group(1)] = len(lines)
        elif (opcode := _OPCODE.search(line)) is not None:
            target = _BRANCH_TARGET.search(line)
            if target and labels.get(target.group(1), len(lines)) < len(lines):  # backward, not to itself
                loops.append((labels[target.group(1)], len(lines)))
            lines.append((opcode.group(1), line))
    loops.sort()
    return [(opcode, tuple(k for k, (a, b) in enumerate(loops) if a <= i <= b), line)
            for i, (opcode, line) in enumerate(lines)]


def cubin_facts(compiled) -> CubinFacts:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = _tool("cuobjdump", "--dump-resource-usage", f.name)
        sass = _tool("nvdisasm", "-c", f.name)
    resources = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    instructions = _loop_nests(sass)
    counts: dict[str, int] = {}
    shapes: dict[str, int] = {}
    nests: dict[str, dict] = {}
    for opcode, nest, line in instructions:
        counts[opcode] = counts.get(opcode, 0) + 1
        entry = nests.setdefault(",".join(map(str, nest)), {"instructions": 0, "mufu": 0, "mma_flops": {},
                                                             "global_bytes": dict.fromkeys(GLOBAL_KINDS, 0)})
        entry["instructions"] += 1
        entry["mufu"] += opcode == "MUFU"
        if (access := global_access(line)) is not None:
            kind, moved = access
            entry["global_bytes"][kind] += moved if kind != "uncounted" else 1
        if (flops := _mma_flops(line)) is not None:
            entry["mma_flops"][flops[0]] = entry["mma_flops"].get(flops[0], 0.0) + flops[1]
        if (wgmma := _HGMMA.search(line)) is not None:
            shape = "x".join(wgmma.groups()[:3])
            shapes[shape] = shapes.get(shape, 0) + 1
    return CubinFacts(registers=int(resources["REG"]), stack_bytes=int(resources["STACK"]),
                      local_loads=counts.get("LDL", 0), local_stores=counts.get("STL", 0),
                      hgmma=counts.get("HGMMA", 0), hmma=counts.get("HMMA", 0),
                      instructions=len(instructions), shared_bytes=compiled.metadata.shared, counts=counts,
                      loop_nests=nests, hgmma_shapes=shapes)


def _compile_in_child(launch: Launch, conn) -> None:
    try:
        conn.send(("ok", asdict(cubin_facts(compile_launch(launch)))))
    except Exception as exc:  # noqa: BLE001 — reported to the parent as this launch's result
        conn.send(("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc) else ''}"))
    finally:
        conn.close()


def sweep(launches: list[Launch], workers: int = 2, timeout_s: float = 600.0) -> list[CubinFacts | str]:
    """cubin facts for each launch, or an error line (compile error, or the compiler process dying)."""
    context = multiprocessing.get_context("fork")  # inherits the compiled kernel definitions
    results: list[CubinFacts | str | None] = [None] * len(launches)
    pending = list(enumerate(launches))
    running = []
    while pending or running:
        while pending and len(running) < workers:
            index, launch = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_compile_in_child, args=(launch, send), daemon=True)
            process.start()
            send.close()
            running.append((index, process, receive))
        index, process, receive = running.pop(0)
        if receive.poll(timeout_s):
            try:
                status, value = receive.recv()
            except EOFError:
                status, value = "error", None
        else:
            status, value = "error", f"no result within {timeout_s:.0f} s"
        process.join(10)
        if value is None:
            value = f"compiler process died (exit code {process.exitcode}): an assertion inside Triton"
        results[index] = CubinFacts(**value) if status == "ok" else value
        receive.close()
    return results


__all__ = ["ARCH", "GLOBAL_KINDS", "CubinFacts", "Launch", "compile_launch", "cubin_facts", "global_access",
           "specialization_key", "sweep"]
