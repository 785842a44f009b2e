"""The sm_90 compile sweep: every fused kernel, with every config it may pick, at every shape it runs at.

    python -m kernels.sweep              # everything (`make check-sm90`)
    python -m kernels.sweep --quick      # the representative part `make test` runs
    python -m kernels.sweep --json PATH  # also write the rows as JSON
    python -m kernels.sweep --kernel expert_query_grad --case "B5 D20 Do30"  # only some launches

No GPU is needed: each launch is compiled for sm_90 as Triton's JIT would compile it on an H100/H200
(`kernels.sm90`), and its cubin is read. A launch fails on a compile error, on any local-memory
instruction (a register spill), and, when its dots can use tensor cores, on SASS without HGMMA (wgmma).
A table (kernel, operands, config, registers, spills, wgmma) is printed, then, for the Triton launches of
the calls `kernels.cost_model` prices (those this sweep compiled), the model's L2 -> SM bytes per program
against the global-memory bytes of the launch's SASS, and the model's wgmma shape against the HGMMA emitted
(`byte_check`). Exit status 1 if any launch fails, the model lies outside the SASS's bytes by more than
BYTE_TOLERANCE, or prices another wgmma than the SASS has.

The launches are the ops' own launch plans (`decoder_experts.expert_plan` / `row_plan`,
`relation_loss.launch_plan`), at the shapes of `kernels.shapes`:
- every decoder and relation-loss call `distill_step_losses` makes for each recipe, at its batch per GPU;
- the kernel tests' shapes (their small ones, and the recipes' calls at the tests' batch), which run
  compiled on a GPU;
- activations in bf16, fp16 and fp32 (IEEE dots); relation targets in fp32, fp16, bf16 and int8 (with
  float32 row scales).
Launches the JIT would specialise identically (same dtypes, same 16-divisibility of the integers, same
constexprs) compile once; a row lists the cases it stands for.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

from kernels import interpreter_selected, select_interpreter
from runtime.arguments import output_file, usable_cores, worker_count


def command_line() -> argparse.ArgumentParser:
    """The options (light: no torch or triton, so that --help and a bad option answer at once)."""
    parser = argparse.ArgumentParser(prog="python -m kernels.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the representative part (make test)")
    parser.add_argument("--json", metavar="PATH", type=output_file,
                        help="also write every row as JSON to PATH (its folder must exist)")
    parser.add_argument("--kernel", action="append", metavar="NAME",
                        help="only this kernel (e.g. expert_query_grad; repeat for several)")
    parser.add_argument("--case", action="append", metavar="TEXT",
                        help='only the launches whose case contains TEXT (e.g. "B5 D20 Do30"; repeat for several)')
    parser.add_argument("--workers", type=worker_count, default=min(2, usable_cores()),
                        help="compiler processes at a time (1 up to the CPU cores, default 2)")
    return parser


if __name__ == "__main__":  # read before torch is imported: --help and a bad option answer at once
    _COMMAND_LINE = command_line().parse_args()
    select_interpreter(False)  # the CLI compiles the kernels: never interpreted, whatever the environment says

import torch  # noqa: E402
import triton  # noqa: E402  (after the choice above)

from dpal.config import DecoderSpec  # noqa: E402
from kernels import decoder_experts as dec, l2_probe, relation_loss as rel, shapes  # noqa: E402
from kernels._common import PlannedLaunch  # noqa: E402
from kernels import cost_model  # noqa: E402
from kernels.sm90 import GLOBAL_KINDS, CubinFacts, Launch, specialization_key, sweep  # noqa: E402

H100_SMS = cost_model.SMS  # the row kernel's grid depends on it
F32 = torch.float32
# Activation dtype per operand kind (`kernels._common.dot_operands`).
OPERANDS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": F32}
TARGETS = {"fp32": F32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
DECODER_EPS = 1e-6  # a runtime float argument: any value compiles the same binary


def _launch(op: str, planned: PlannedLaunch, case: str, kind: str) -> Launch:
    return Launch(op, planned.kernel, planned.tensors | planned.scalars | dict(planned.config.tiles),
                  planned.config.num_warps, planned.config.num_stages, planned.config.label,
                  case + (f" | {planned.part}" if planned.part else ""),
                  kind != "fp32" and "DOT_PRECISION" in planned.scalars,  # IEEE fp32 dots run on FMA units
                  math.prod(planned.grid))


def decoder_launches(batch, patterns, dim, out_dim, tokens, kind, sm_count: int | None = H100_SMS) -> list[Launch]:
    """The decoder op's launches for one call, on a GPU with `sm_count` SMs (None: the interpreter's grid)."""
    dtype = OPERANDS[kind]
    case = f"B{batch} D{dim} Do{out_dim} L{tokens}"
    # Scores come from a softmax, float32 under autocast; the float arguments do not change the binary.
    plan = dec.expert_plan(batch, patterns, dim, out_dim, dtype, F32, DecoderSpec.mix_divisor,
                           DecoderSpec.experts_loss_weight, DECODER_EPS, sm_count)
    rows = dec.row_plan(batch * tokens, out_dim, dtype, DECODER_EPS, sm_count)
    return [_launch("decoder", planned, case, kind)
            for planned in (*plan["forward"], *plan["backward"], rows["forward"], rows["backward"])]


def relation_launches(batch, n, dim, kind, target) -> list[Launch]:
    """The relation op's launches for one call (targets `target`, int8 with float32 row scales)."""
    plan = rel.launch_plan(batch, n, dim, OPERANDS[kind], TARGETS[target])
    case = f"B{batch} N{n} D{dim} target {target}"
    return [_launch("relation", planned, case, kind) for planned in (plan["forward"], *(p for p, _ in plan["backward"]))]


def probe_launch() -> Launch:
    """The L2 probe (`kernels.l2_probe`) as `kernels.bench` launches it on an H100 or H200 (Triton's default
    pipeline depth: the probe sets none)."""
    programs = l2_probe.PROGRAMS_PER_SM * H100_SMS
    return Launch("probe", l2_probe._l2_read_kernel,
                  dict(x_ptr=F32, sums_ptr=F32, programs=programs, PASSES=l2_probe.PASSES, BLOCK=l2_probe.BLOCK,
                       BLOCKS_PER_PROGRAM=l2_probe.BLOCKS_PER_PROGRAM),
                  l2_probe.WARPS, 3, "probe", f"{programs} programs", False, programs)


def sweep_shapes(quick: bool) -> tuple[list[tuple], list[tuple]]:
    """(decoder (B, P, D, D_o, L), relation (B, N, D)) compiled: every recipe's calls at its batch, and every
    shape the kernel tests run on a GPU; quick: the target recipe's calls only."""
    if quick:
        recipes = [shapes.TARGET_RECIPE]
        return sorted(shapes.decoder_calls(recipes=recipes)), sorted(shapes.relation_calls(recipes=recipes))
    decoder = {*shapes.decoder_calls(), *shapes.decoder_calls(shapes.CUDA_TEST_BATCH), *shapes.DECODER_TEST_SHAPES}
    relation = {*shapes.relation_calls(), *shapes.relation_calls(shapes.CUDA_TEST_BATCH),
                *shapes.RELATION_TEST_SHAPES}
    return sorted(decoder), sorted(relation)


def all_launches(quick: bool) -> list[Launch]:
    """The whole sweep, or (quick) bf16 activations at the target recipe's shapes with the fp32, fp16 and int8
    target formats: each kernel once, with the config training picks; and the bench's L2 probe in both."""
    launches = []
    decoder, relation = sweep_shapes(quick)
    for kind in ("bf16",) if quick else tuple(OPERANDS):
        for batch, patterns, dim, out_dim, tokens in decoder:
            launches += decoder_launches(batch, patterns, dim, out_dim, tokens, kind)
        for batch, n, dim in relation:
            for target in ("fp32", "fp16", "int8") if quick else TARGETS:
                launches += relation_launches(batch, n, dim, kind, target)
    return launches + [probe_launch()]


class Loop(NamedTuple):
    trips: int
    parent: int  # index of the loop it sits in, -1 for none
    pipelined: bool = False  # Triton's software pipeline issues its cp.async copies num_stages - 1 trips ahead


def _loop_trips(launch: Launch) -> list[list[Loop]]:
    """The kernel's possible loop structures in SASS, each a list of loops in code order (see `kernels.sm90.
    CubinFacts.loop_nests`), from its arguments. D is a constexpr, so the compiler may unroll a K loop (the
    expert passes' 3 steps, the relation tiles' 12 to 16 steps with bf16 operands) or keep it (the IEEE fp32
    tiles' longer ones); `executed_counts` takes the structure the SASS has and fails on any other rather than
    count it wrong. The K loops are the software-pipelined ones."""
    a, name = launch.args, launch.kernel_name
    k = triton.cdiv(a.get("D", 1), a.get("BLOCK_K", 1))
    if name in dec.PER_SAMPLE_KERNELS:  # loops over the tiles' partials, one after another (patterns unrolled)
        tiles = triton.cdiv(a["n_tiles"], a["BLOCK_T"])
        return [[Loop(tiles, -1)] * loops for loops in range(1, 4 * a["P"] + 3)]
    if name == "expert_weight_grad":  # blocks of query rows (the K tiles unrolled)
        return [[Loop(triton.cdiv(a["B"] * a["P"], a["BLOCK_R"]), -1, True)]]
    if name in dec.HELD_KERNEL_NAMES:  # a slice's column tiles, on average over the slices; the K tiles unrolled
        # with held queries, else a K loop inside (or unrolled)
        slices = launch.programs // triton.cdiv(a["B"], a["BLOCK_B"])
        tiles = a["n_tiles"] / slices
        return [[Loop(tiles, -1, True)]] if a["HOLD_QUERIES"] else [[Loop(tiles, -1), Loop(k, 0, True)],
                                                                     [Loop(tiles, -1, True)]]
    if name == "expert_query_grad":  # a slice's column tiles, on average over the slices (the K tiles unrolled)
        slices = launch.programs // triton.cdiv(a["B"] * a["P"], a["BLOCK_R"])
        return [[Loop(triton.cdiv(a["M"], a["BLOCK_M"]) / slices, -1, True)]]
    if name.startswith("relation_kl"):  # the K loop (column blocks unrolled inside it)
        return [[Loop(k, -1, True)], []]
    if name == "gelu_layer_norm_bwd":
        return [[Loop(a["blocks_per_program"], -1)]]
    if name == "l2_read":  # the passes (a program's blocks unrolled inside)
        return [[Loop(a["PASSES"], -1)]]
    return [[]]


def _loop_structure(launch: Launch, facts: CubinFacts) -> list[Loop]:
    """The structure of `_loop_trips` whose nests are exactly the SASS's (a nest lists a loop and its parents)."""
    def nests(loops):
        def chain(i):
            return chain(loops[i].parent) + [i] if i >= 0 else []
        return {",".join(map(str, chain(i))) for i in range(len(loops))} | {""}
    found = set(facts.loop_nests)
    for loops in _loop_trips(launch):
        if found <= nests(loops) and len(found) == len(nests(loops)):
            return loops
    raise ValueError(f"{launch.kernel_name} ({launch.config}): its SASS has the loop nests {sorted(found)}, which no "
                     f"structure the loop model knows has: update _loop_trips")


def _work(launch: Launch) -> dict:
    """Elements (of u, S or z) and useful dot FLOPs of one launch."""
    a, name = launch.args, launch.kernel_name
    if name in dec.PER_SAMPLE_KERNELS:  # every per-tile partial of every sample, read once or twice
        partials = launch.programs * a["n_tiles"] * (2 * a["P"] if name == "expert_stats_merge" else a["P"] + 2)
        return dict(elements=partials, flops=0.0)
    if name.startswith("expert_"):  # u's elements; the flat passes' second GEMM (dW or dq) doubles the FLOPs
        rows = a["B"] * a["P"]
        gemms = 2 if name in dec.FLAT_KERNEL_NAMES else 1
        return dict(elements=rows * a["M"], flops=2.0 * gemms * rows * a["M"] * a["D"])
    if name.startswith("relation_kl"):
        n = a["N"]
        if name.endswith("fwd"):  # every (i, j) of its row blocks; S once per ordered pair
            batch = launch.programs // triton.cdiv(n, a["BLOCK_I"])
            return dict(elements=batch * n * n, flops=2.0 * a["D"] * batch * n * n)
        # the outputs of its tile pairs (full blocks, or the tail's); S once per unordered pair
        full = n // a["BLOCK_I"] * a["BLOCK_I"]
        tiles = rel.tile_pairs(n, a["BLOCK_I"], rel.tail_block(n, a["BLOCK_I"]))[1 if a["MASK_J"] else 0]
        pairs = launch.programs // len(tiles) * (n * n - full * full if a["MASK_J"] else full * full)
        return dict(elements=pairs, flops=1.0 * a["D"] * pairs)
    if name == "l2_read":  # every value of every pass
        return dict(elements=launch.programs * a["PASSES"] * a["BLOCKS_PER_PROGRAM"] * a["BLOCK"], flops=0.0)
    return dict(elements=a.get("n_rows", launch.programs) * a["width"], flops=0.0)


def resident_warps(launch: Launch, facts: CubinFacts) -> int:
    """Warps an SM can hold of this kernel: CTAs limited by registers (65,536 per SM, allocated per warp in
    units of 256), shared memory (228 KiB per SM, 1 KiB reserved per CTA), 32 CTAs and 64 warps."""
    per_warp = -(-facts.registers * 32 // 256) * 256
    ctas = min(32, 65536 // (per_warp * launch.num_warps), 233472 // (facts.shared_bytes + 1024))
    return min(64, ctas * launch.num_warps)


def _executed(loops: list[Loop], facts: CubinFacts, value, lead: int = 0) -> float:
    """Sum over the SASS's loop nests of value(nest entry) x the trips of every loop around it; a pipelined
    loop's trips less `lead` (the trips whose prefetches are predicated off, for cp.async copies)."""
    def trips(nest: str) -> int:
        inside = [loops[int(k)] for k in nest.split(",") if k]
        return math.prod(max(0, loop.trips - (lead if loop.pipelined else 0)) for loop in inside)
    return sum(value(entry) * trips(nest) for nest, entry in facts.loop_nests.items())


def executed_counts(launch: Launch, facts: CubinFacts) -> dict:
    """Executed SASS of the launch (static counts per loop nest x trip counts x warps x programs): warp
    instructions, MUFU instructions and tensor-core FLOPs, per element of its output. Raises if the loop model
    undercounts the kernel's MMAs. Counts, not times: `kernels.cost_model` owns the predictions."""
    scale = launch.num_warps * launch.programs
    work = _work(launch)
    loops = _loop_structure(launch, facts)
    warp_instructions = scale * _executed(loops, facts, lambda entry: entry["instructions"])
    mufu = scale * _executed(loops, facts, lambda entry: entry["mufu"])
    tensor_flops = scale * _executed(loops, facts, lambda entry: sum(entry["mma_flops"].values()))
    if tensor_flops and tensor_flops < work["flops"] * (1 - 1e-6):
        raise ValueError(f"{launch.kernel_name}: {tensor_flops:.3g} tensor-core FLOPs counted, fewer than the "
                         f"{work['flops']:.3g} the launch must do: the loop trip counts are wrong")
    return dict(work, warps_per_sm=resident_warps(launch, facts), warp_instructions=warp_instructions,
                sass_per_element=warp_instructions * 32 / work["elements"],
                mufu_per_element=mufu * 32 / work["elements"], tensor_flops=tensor_flops)


def sass_bytes_per_program(launch: Launch, facts: CubinFacts) -> dict[str, float]:
    """Global-memory bytes one program's SASS moves, by kind (`kernels.sm90.global_access`): per loop nest, a
    warp's bytes x the trips of the loops around it, x warps. A software-pipelined loop that the SASS keeps
    issues in each trip the cp.async copies of the trip num_stages - 1 ahead, predicated off at run time in
    its last num_stages - 1 trips (the first trips' copies sit before it): its copies count trips - (stages -
    1) times. ("uncounted": TMA or bulk copies, instructions executed.)"""
    loops = _loop_structure(launch, facts)
    return {kind: launch.num_warps * _executed(loops, facts, lambda entry: entry["global_bytes"][kind],
                                               launch.num_stages - 1 if kind.startswith("copy") else 0)
            for kind in GLOBAL_KINDS}


@dataclass
class Row:
    kernel: str
    operands: str
    config: str
    cases: list[str]
    tensor_core: bool
    facts: CubinFacts | None
    error: str | None

    @property
    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        found = []
        if self.facts.spills:
            found.append(f"{self.facts.local_loads} LDL + {self.facts.local_stores} STL (register spills)")
        if self.tensor_core and not self.facts.hgmma:
            found.append(f"no wgmma (HGMMA) in SASS ({self.facts.hmma} HMMA)")
        return found


def operand_kind(launch: Launch) -> str:
    """The OPERANDS key of a launch: its first tensor's dtype."""
    first = next(v for v in launch.args.values() if isinstance(v, torch.dtype))
    return next(k for k, dt in OPERANDS.items() if dt == first)


def _operands(launch: Launch) -> str:
    args = launch.args
    kind = operand_kind(launch)
    if "t_ptr" in args:
        kind += " / target " + next(k for k, dt in TARGETS.items() if dt == args["t_ptr"])
    return kind


def run(launches: list[Launch], workers: int, counted: list | None = None,
        compiled: dict | None = None) -> list[Row]:
    """One row per distinct compile; `counted`, when given, receives (launch, facts, executed_counts) per launch,
    and `compiled` {specialization_key: facts} of the binaries whose loop structure the counts fit."""
    groups: dict[tuple, list[Launch]] = {}
    for launch in launches:
        groups.setdefault(specialization_key(launch), []).append(launch)
    firsts = [group[0] for group in groups.values()]
    results = sweep(firsts, workers=workers)
    if counted is not None:
        for key, group, result in zip(groups, groups.values(), results):
            if isinstance(result, str):
                continue
            counts = [(launch, result, _counts_or_error(launch, result)) for launch in group]
            counted.extend(counts)
            if compiled is not None and not any("error" in c for _, _, c in counts):
                compiled[key] = result
    rows = []
    for group, result in zip(groups.values(), results):
        first = group[0]
        rows.append(Row(first.kernel_name, _operands(first), first.config, sorted({g.case for g in group}),
                        first.tensor_core, None if isinstance(result, str) else result,
                        result if isinstance(result, str) else None))
    return rows


def _counts_or_error(launch: Launch, facts: CubinFacts) -> dict:
    """executed_counts, or {"error": why} when the loop model does not fit the kernel's SASS (reported, so that
    the compile checks of the other launches still run)."""
    try:
        return executed_counts(launch, facts)
    except ValueError as exc:
        return {"error": str(exc)}


def aggregate_counts(counted: list) -> list[dict]:
    """Per (kernel, operands, call): a call's launches (du chunks, backward's tile sets) in one row: work and
    instructions summed, per-element figures weighted by elements, the most registers and spills and the
    fewest resident warps of its binaries, the first launch's config."""
    calls: dict[tuple, dict] = {}
    for launch, facts, counts in counted:
        key = (launch.kernel_name, _operands(launch), launch.case.split(" | ")[0])
        if "error" in counts or "error" in calls.get(key, {}):
            calls[key] = dict(kernel=key[0], operands=key[1], case=key[2], config=launch.config,
                              error=counts.get("error") or calls[key]["error"])
            continue
        total = calls.setdefault(key, dict(kernel=key[0], operands=key[1], case=key[2], config=launch.config,
                                           launches=0, registers=0, spills=0, hgmma=facts.hgmma, hmma=facts.hmma,
                                           warps_per_sm=64, static_sass=facts.instructions))
        total["launches"] += 1
        total["registers"] = max(total["registers"], facts.registers)
        total["spills"] = max(total["spills"], facts.spills)
        total["warps_per_sm"] = min(total["warps_per_sm"], counts["warps_per_sm"])
        for name, value in counts.items():
            if name.endswith("per_element"):
                total["_" + name] = total.get("_" + name, 0.0) + value * counts["elements"]
            elif name != "warps_per_sm":
                total[name] = total.get(name, 0.0) + value
    for total in calls.values():
        for name in [k for k in total if k.startswith("_")]:
            total[name[1:]] = total.pop(name) / total["elements"]
    return list(calls.values())


# How far the cost model's L2 -> SM bytes per program may lie outside what the SASS moves (`byte_check`): the
# SASS counts the masked lanes of ragged tiles (N = 257 in blocks of 64 and a tail of 16: 6%) and a program's
# small per-column and per-row loads and stores the model leaves out.
BYTE_TOLERANCE = 0.10


def _listed_launches(op: str, shape: tuple) -> list[Launch]:
    """The sweep's launches of one `cost_model.CALLS` call (bf16 activations)."""
    if op == "decoder":
        batch, dim, out_dim, tokens = shape
        return decoder_launches(batch, DecoderSpec.num_patterns, dim, out_dim, tokens, "bf16")
    batch, n, dim, target = shape
    return relation_launches(batch, n, dim, "bf16", target)


def _triton_launches(call: str) -> list[cost_model.Launch]:
    return [launch for launch in cost_model.plan(call, before=False) if not launch.small and not launch.gemm_tiles]


def sass_bytes(compiled: dict) -> list[dict]:
    """Per Triton launch of every `cost_model.CALLS` call whose binary is in `compiled` ({specialization_key:
    CubinFacts}): the global-memory bytes one program's SASS moves (`sass_bytes_per_program`), as the bytes
    certain to come from or go to L2 (cp.async.cg copies, which skip L1, and stores) and all of them (loads
    through L1 counted as if each missed; replicated loads of a program's warps mostly hit there). A launch
    repeated with the same binary and grid (the du chunks) is one row. The per-sample kernels are listed
    unchecked: the compiler unrolls their run-time loops by four with the remainder outside, so static counts
    x trips overcount them."""
    rows, seen = [], set()
    for call, (op, shape) in cost_model.CALLS.items():
        for index, (model, launch) in enumerate(zip(_triton_launches(call), _listed_launches(op, shape), strict=True)):
            if model.name.split(" ")[0] != launch.kernel_name or model.programs != launch.programs:
                raise ValueError(f"{call}: the cost model's launch {index} is {model.name} x {model.programs}, the "
                                 f"op's is {launch.kernel_name} x {launch.programs}")
            key = specialization_key(launch)
            if key not in compiled or (call, key, launch.programs) in seen:
                continue
            seen.add((call, key, launch.programs))
            moved = sass_bytes_per_program(launch, compiled[key])
            row = dict(call=call, index=index, launch=model.name, config=launch.config, programs=launch.programs,
                       sass_l2_bytes=moved["copy_bypass"] + moved["store"],
                       sass_all_bytes=sum(v for k, v in moved.items() if k != "uncounted"),
                       sass_wgmma_n=sorted({int(shape.split("x")[1]) for shape in compiled[key].hgmma_shapes}),
                       sass_programs_per_sm=resident_warps(launch, compiled[key]) // launch.num_warps)
            if launch.kernel_name in dec.PER_SAMPLE_KERNELS:
                row["unchecked"] = "run-time loops unrolled by the compiler"
            elif moved["uncounted"]:
                row["unchecked"] = "TMA or bulk copies, whose bytes the SASS does not give"
            rows.append(row)
    return rows


def byte_check(rows: list[dict], tolerance: float = BYTE_TOLERANCE) -> list[dict]:
    """`sass_bytes` rows with the cost model's L2 -> SM bytes per program, wgmma N and programs per SM of the
    same launch, and a verdict: ok when the model's bytes lie within [certain x (1 - tolerance), all x (1 +
    tolerance)] of the SASS's, the wgmma N the model prices its tensor-core time at is the largest N of the
    SASS's HGMMA (the main product's; a kernel's smaller dots emit narrower ones), or both have none, and the
    programs an SM holds by the binary's registers and shared memory give the launch no more waves than the
    model counts (a model that holds more programs per SM than fit undercounts its waves and tail; one that
    holds fewer is reported beside it)."""
    checked, plans = [], {call: _triton_launches(call) for call in {row["call"] for row in rows}}
    for row in rows:
        model = plans[row["call"]][row["index"]]
        per_program = model.l2_bytes / model.programs
        low, high = row["sass_l2_bytes"] * (1 - tolerance), row["sass_all_bytes"] * (1 + tolerance)
        emitted = max(row["sass_wgmma_n"], default=0)
        problems = ([] if low <= per_program <= high else [f"the model is outside [{low:.0f}, {high:.0f}] bytes"]) + \
            ([] if model.wgmma == emitted else [f"the model prices wgmma 64x{model.wgmma}, the SASS's is 64x{emitted}"])
        waves = [math.ceil(model.programs / (cost_model.SMS * per_sm))
                 for per_sm in (model.per_sm, row["sass_programs_per_sm"])]
        if waves[1] > waves[0]:
            problems.append(f"the model holds {model.per_sm} programs per SM, the SASS's registers and shared memory "
                            f"{row['sass_programs_per_sm']}: {waves[1]} waves, not {waves[0]}")
        verdict = row.get("unchecked") or ("FAILED: " + "; ".join(problems) if problems else "ok")
        checked.append(dict(row, model_bytes=per_program, model_wgmma_n=model.wgmma,
                            model_programs_per_sm=model.per_sm, verdict=verdict))
    return checked


def byte_check_failed(checked: list[dict]) -> list[dict]:
    return [row for row in checked if row["verdict"].startswith("FAILED")]


def print_byte_check(checked: list[dict]) -> None:
    print(f"\nL2 -> SM bytes per program: kernels.cost_model against the SASS's global-memory instructions "
          f"(sm_90; tolerance {BYTE_TOLERANCE:.0%})")
    print(f"{'call':22} {'launch':24} {'config':18} {'progs':>6} {'model kB':>9} {'SASS L2 kB':>10} "
          f"{'SASS all kB':>11} {'wgmma N':>7} {'SASS N':>7} {'per SM':>6} {'SASS':>4}  verdict")
    for row in checked:
        emitted = ",".join(map(str, row["sass_wgmma_n"])) or "-"
        print(f"{row['call']:22} {row['launch'][:24]:24} {row['config']:18} {row['programs']:6} "
              f"{row['model_bytes'] / 1e3:9.1f} {row['sass_l2_bytes'] / 1e3:10.1f} {row['sass_all_bytes'] / 1e3:11.1f}"
              f" {row['model_wgmma_n'] or '-':>7} {emitted:>7} {row['model_programs_per_sm']:6} "
              f"{row['sass_programs_per_sm']:4}  {row['verdict']}")
    print("SASS L2: cp.async.cg copies and stores, which reach L2 whatever L1 holds; SASS all: every global load, "
          "copy and store (loads through L1 as if each missed); masked lanes count; per SM: programs an SM holds, "
          "the model's and by the binary's registers and shared memory")


def print_table(rows: list[Row]) -> None:
    header = (f"{'kernel':22} {'operands':18} {'config':18} {'regs':>4} {'spill':>5} {'HGMMA':>5} {'HMMA':>4} "
              f"{'SASS':>5} {'cases':>5}  result")
    print(header)
    print("-" * len(header))
    for row in sorted(rows, key=lambda r: (r.kernel, r.operands, r.config)):
        f = row.facts
        numbers = (f"{f.registers:4} {f.spills:5} {f.hgmma:5} {f.hmma:4} {f.instructions:5}" if f else
                   f"{'-':>4} {'-':>5} {'-':>5} {'-':>4} {'-':>5}")
        print(f"{row.kernel:22} {row.operands:18} {row.config:18} {numbers} {len(row.cases):5}  "
              + ("; ".join(row.problems) or "ok"))


def main(argv=None) -> int:
    return run_command(command_line().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Compile every launch as the parsed options ask; prints the table, writes the JSON; 1 if any failed."""
    if interpreter_selected():
        raise SystemExit("kernels.sweep compiles the kernels, but this process defined them interpreted "
                         "(TRITON_INTERPRET=1): run it as `python -m kernels.sweep`, which compiles them")
    start = time.perf_counter()
    launches = [launch for launch in all_launches(args.quick)
                if (not args.kernel or launch.kernel_name in args.kernel)
                and (not args.case or any(text in launch.case for text in args.case))]
    if not launches:
        command_line().error("no launch of the sweep matches --kernel/--case; the kernels are "
                     + ", ".join(sorted({launch.kernel_name for launch in all_launches(args.quick)})))
    counted: list = []
    compiled: dict = {}
    rows = run(launches, args.workers, counted, compiled)
    seconds = time.perf_counter() - start
    print_table(rows)
    failed = [r for r in rows if r.problems]
    print(f"\n{len(launches)} launches, {len(rows)} distinct compiles for sm_90 in {seconds:.0f} s "
          f"(triton {triton.__version__}); {len(failed)} failed")
    checked = byte_check(sass_bytes(compiled))
    if checked:
        print_byte_check(checked)
        print(f"{len(byte_check_failed(checked))} of {len(checked)} launches outside the tolerance")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "seconds": seconds, "quick": args.quick,
                       "rows": [asdict(r) | {"problems": r.problems} for r in rows],
                       "executed": aggregate_counts(counted), "byte_check": checked}, f, indent=2)
    return 1 if failed or byte_check_failed(checked) else 0


if __name__ == "__main__":
    sys.exit(run_command(_COMMAND_LINE))
