"""The sm_90 compile sweep: every fused kernel, with every config it may pick, at every shape it runs at.

    python -m kernels.sweep              # everything (`make check-sm90`)
    python -m kernels.sweep --quick      # the representative part `make test` runs
    python -m kernels.sweep --json PATH  # also write the rows as JSON
    python -m kernels.sweep --kernel expert_grad --case "B5 D20 Do30"  # only some launches

No GPU is needed: each launch is compiled for sm_90 as Triton's JIT would compile it on an H100/H200
(`kernels.sm90`), and its cubin is read. A launch fails on a compile error, on any local-memory
instruction (a register spill), and, when its dots can use tensor cores, on SASS without HGMMA (wgmma).
Exit status 1 if any launch fails; a table (kernel, operands, config, registers, spills, wgmma) is
printed last.

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
                        help="only this kernel (e.g. expert_grad; repeat for several)")
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
from kernels import decoder_experts as dec, relation_loss as rel, shapes  # noqa: E402
from kernels._common import PlannedLaunch  # noqa: E402
from kernels.sm90 import CubinFacts, Launch, specialization_key, sweep  # noqa: E402

H100_SMS = 132  # H100 SXM and H200 alike: the row kernel's grid depends on it
F32 = torch.float32
# Activation dtype per operand kind (`kernels._common.dot_operands`).
OPERANDS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": F32}
TARGETS = {"fp32": F32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
DECODER_EPS = 1e-6  # a runtime float argument: any value compiles the same binary
# The decoder's kernels that run one program per sample over per-tile partials (no dots).
PER_SAMPLE_KERNELS = ("expert_stats_merge", "expert_grad_constants")


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
                           DecoderSpec.experts_loss_weight, DECODER_EPS)
    rows = dec.row_plan(batch * tokens, out_dim, dtype, DECODER_EPS, sm_count)
    return [_launch("decoder", planned, case, kind)
            for planned in (*plan["forward"], *plan["backward"], rows["forward"], rows["backward"])]


def relation_launches(batch, n, dim, kind, target) -> list[Launch]:
    """The relation op's launches for one call (targets `target`, int8 with float32 row scales)."""
    plan = rel.launch_plan(batch, n, dim, OPERANDS[kind], TARGETS[target])
    case = f"B{batch} N{n} D{dim} target {target}"
    return [_launch("relation", planned, case, kind) for planned in (plan["forward"], *(p for p, _ in plan["backward"]))]


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
    target formats: each kernel once, with the config training picks."""
    launches = []
    decoder, relation = sweep_shapes(quick)
    for kind in ("bf16",) if quick else tuple(OPERANDS):
        for batch, patterns, dim, out_dim, tokens in decoder:
            launches += decoder_launches(batch, patterns, dim, out_dim, tokens, kind)
        for batch, n, dim in relation:
            for target in ("fp32", "fp16", "int8") if quick else TARGETS:
                launches += relation_launches(batch, n, dim, kind, target)
    return launches


# Datasheet ceilings (H100 SXM, H200): memory bandwidth, and per SM at the 1.98 GHz boost clock: 4 warp
# instructions issued per clock, 16 special-function (MUFU) lanes per clock, i.e. half a warp instruction,
# and the dense tensor-core rate per input type (989 TF/s bf16/fp16, half that tf32); IEEE fp32 dots run on
# the FMA units (128 lanes x 2 FLOPs per clock per SM).
SMS, CLOCK = 132, 1.98e9
CEILINGS = {"H100": {"bytes": 3.35e12}, "H200": {"bytes": 4.8e12}}
ISSUE_RATE = SMS * 4 * CLOCK  # warp instructions per second
SFU_RATE = SMS * 0.5 * CLOCK  # MUFU warp instructions per second
TENSOR_FLOPS = {"BF16": 989e12, "F16": 989e12, "TF32": 494.7e12}  # by SASS input type
DOT_FLOPS = {"bf16": 989e12, "fp16": 989e12, "fp32": SMS * 128 * 2 * CLOCK}  # by operand kind


def _loop_trips(launch: Launch) -> list[list[tuple[int, int]]]:
    """The kernel's possible loop structures in SASS, each a list of loops in code order (see `kernels.sm90.
    CubinFacts.loop_nests`) given as (trip count, index of the loop it sits in or -1), from its arguments.
    D is a constexpr, so the compiler may unroll a K loop (the expert passes' 3 steps, the relation tiles' 12 to
    16 steps with bf16 operands) or keep it (the IEEE fp32 tiles' longer ones); `estimated_cost`
    takes the structure the SASS has and fails on any other rather than price it wrong."""
    a, name = launch.args, launch.kernel_name
    k = triton.cdiv(a.get("D", 1), a.get("BLOCK_K", 1))
    if name in PER_SAMPLE_KERNELS:  # loops over the tiles' partials, one after another (patterns unrolled)
        tiles = triton.cdiv(a["n_tiles"], a["BLOCK_T"])
        return [[(tiles, -1)] * loops for loops in range(1, 4 * a["P"] + 3)]
    if name == "expert_grad":  # row blocks, the K loop inside (the patterns are unrolled in both)
        blocks = triton.cdiv(a["B"], a["BLOCK_B"])
        return [[(blocks, -1), (k, 0)], [(blocks, -1)]]
    if name.startswith("expert_"):  # the K loop (the patterns are unrolled inside it)
        return [[(k, -1)], []]
    if name == "relation_kl_fwd":  # one K loop for all column blocks (unrolled inside it), or none (unrolled)
        return [[(k, -1)], []]
    if name == "relation_kl_bwd":
        return [[(k, -1)], []]
    if name == "gelu_layer_norm_bwd":
        return [[(a["blocks_per_program"], -1)]]
    return [[]]


def _loop_structure(launch: Launch, facts: CubinFacts) -> list[tuple[int, int]]:
    """The structure of `_loop_trips` whose nests are exactly the SASS's (a nest lists a loop and its parents)."""
    def nests(loops):
        def chain(i):
            return chain(loops[i][1]) + [i] if i >= 0 else []
        return {",".join(map(str, chain(i))) for i in range(len(loops))} | {""}
    found = set(facts.loop_nests)
    for loops in _loop_trips(launch):
        if found <= nests(loops) and len(found) == len(nests(loops)):
            return loops
    raise ValueError(f"{launch.kernel_name} ({launch.config}): its SASS has the loop nests {sorted(found)}, which no "
                     f"structure the cost model knows has: update _loop_trips")


def _work(launch: Launch) -> dict:
    """Elements (of u, S or z), useful dot FLOPs and compulsory bytes of one launch."""
    a, name = launch.args, launch.kernel_name
    size = torch.empty((), dtype=a.get("q_ptr", a.get("y_ptr", a.get("z_ptr")))).element_size()
    if name in PER_SAMPLE_KERNELS:  # every per-tile partial of every sample, read once or twice
        partials = launch.programs * a["n_tiles"] * (2 * a["P"] if name == "expert_stats_merge" else a["P"] + 2)
        return dict(elements=partials, flops=0.0, bytes=4.0 * partials)
    if name.startswith("expert_"):
        batch, dim = a["B"], a["D"]
        columns = a["m_stop"] - a["m_start"] if name == "expert_grad" else a["M"]
        rows = batch * a["P"]
        moved = {"expert_stats": rows * dim + columns * dim, "expert_mix": rows * dim + columns * dim + batch * columns,
                 "expert_grad_stats": rows * dim + columns * dim + 2 * batch * columns,
                 "expert_grad": rows * dim + columns * dim + 2 * batch * columns + rows * columns}[name]
        return dict(elements=rows * columns, flops=2.0 * rows * columns * dim, bytes=size * moved)
    if name.startswith("relation_kl"):
        n, target_size = a["N"], torch.empty((), dtype=a["t_ptr"]).element_size()
        if name.endswith("fwd"):  # every (i, j) of its row blocks; S once per ordered pair
            batch = launch.programs // triton.cdiv(n, a["BLOCK_I"])
            pairs, flops_per_pair, share = batch * n * n, 2.0 * a["D"], 1.0
        else:  # the outputs of its tile pairs (full blocks, or the tail's); S once per unordered pair
            full = n // a["BLOCK_I"] * a["BLOCK_I"]
            tiles = rel.tile_pairs(n, a["BLOCK_I"], rel.tail_block(n, a["BLOCK_I"]))[1 if a["MASK_J"] else 0]
            share = (n * n - full * full if a["MASK_J"] else full * full) / (n * n)
            batch = launch.programs // len(tiles)
            pairs, flops_per_pair = batch * n * n * share, 1.0 * a["D"]
        gradient = size * n * n if name.endswith("bwd") else 0
        moved = share * batch * (size * n * a["D"] + target_size * n * n + gradient)
        return dict(elements=pairs, flops=flops_per_pair * pairs, bytes=moved)
    rows = a.get("n_rows", launch.programs)
    return dict(elements=rows * a["width"], flops=0.0, bytes=size * rows * a["width"] * (3 if "bwd" in name else 2))


def resident_warps(launch: Launch, facts: CubinFacts) -> int:
    """Warps an SM can hold of this kernel: CTAs limited by registers (65,536 per SM, allocated per warp in
    units of 256), shared memory (228 KiB per SM, 1 KiB reserved per CTA), 32 CTAs and 64 warps. The
    predicted times assume enough of them to hide latency; with 8 or fewer that is doubtful."""
    per_warp = -(-facts.registers * 32 // 256) * 256
    ctas = min(32, 65536 // (per_warp * launch.num_warps), 233472 // (facts.shared_bytes + 1024))
    return min(64, ctas * launch.num_warps)


def estimated_cost(launch: Launch, facts: CubinFacts) -> dict:
    """Executed SASS (static counts per loop nest x trip counts x warps x programs) and the predicted time:
    the largest of the issue-bound, special-function-bound, executed tensor-FLOP-bound, useful-FLOP-bound and
    byte-bound times at the datasheet ceilings. Raises if the loop model undercounts the kernel's MMAs."""
    trips = [count for count, _ in _loop_structure(launch, facts)]
    scale = launch.num_warps * launch.programs

    def executed(field: str, kind: str | None = None) -> float:
        return scale * sum((entry[field] if kind is None else entry[field].get(kind, 0.0))
                           * math.prod(trips[int(k)] for k in nest.split(",") if k)
                           for nest, entry in facts.loop_nests.items())

    work = _work(launch)
    warp_instructions = executed("instructions")
    mufu = executed("mufu")
    tensor_flops = {kind: executed("mma_flops", kind) for kind in
                    {kind for entry in facts.loop_nests.values() for kind in entry["mma_flops"]}}
    if tensor_flops and sum(tensor_flops.values()) < work["flops"] * (1 - 1e-6):
        raise ValueError(f"{launch.kernel_name}: {sum(tensor_flops.values()):.3g} tensor-core FLOPs counted, fewer "
                         f"than the {work['flops']:.3g} the launch must do: the loop trip counts are wrong")
    cost = dict(work, warps_per_sm=resident_warps(launch, facts), warp_instructions=warp_instructions,
                sass_per_element=warp_instructions * 32 / work["elements"],
                mufu_per_element=mufu * 32 / work["elements"],
                tensor_flops=sum(tensor_flops.values()),
                issue_ms=1e3 * warp_instructions / ISSUE_RATE, sfu_ms=1e3 * mufu / SFU_RATE,
                tensor_ms=1e3 * sum(f / TENSOR_FLOPS[kind] for kind, f in tensor_flops.items()))
    dot_peak = DOT_FLOPS[operand_kind(launch)]
    for gpu, ceiling in CEILINGS.items():
        cost[f"floor_ms_{gpu}"] = 1e3 * max(work["flops"] / dot_peak, work["bytes"] / ceiling["bytes"])
        cost[f"predicted_ms_{gpu}"] = max(cost[f"floor_ms_{gpu}"], cost["issue_ms"], cost["sfu_ms"], cost["tensor_ms"])
    return cost


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


def run(launches: list[Launch], workers: int, costs: list | None = None) -> list[Row]:
    """One row per distinct compile; `costs`, when given, receives (launch, facts, estimated_cost) per launch."""
    groups: dict[tuple, list[Launch]] = {}
    for launch in launches:
        groups.setdefault(specialization_key(launch), []).append(launch)
    firsts = [group[0] for group in groups.values()]
    results = sweep(firsts, workers=workers)
    if costs is not None:
        costs.extend((launch, result, _cost_or_error(launch, result))
                     for group, result in zip(groups.values(), results) if not isinstance(result, str)
                     for launch in group)
    rows = []
    for group, result in zip(groups.values(), results):
        first = group[0]
        rows.append(Row(first.kernel_name, _operands(first), first.config, sorted({g.case for g in group}),
                        first.tensor_core, None if isinstance(result, str) else result,
                        result if isinstance(result, str) else None))
    return rows


def _cost_or_error(launch: Launch, facts: CubinFacts) -> dict:
    """estimated_cost, or {"error": why} when the cost model does not fit the kernel's SASS (reported, so that
    the compile checks of the other launches still run)."""
    try:
        return estimated_cost(launch, facts)
    except ValueError as exc:
        return {"error": str(exc)}


def aggregate_costs(costs: list) -> list[dict]:
    """Per (kernel, operands, call): a call's launches (du chunks, backward's tile sets) in one row: times, work
    and instructions summed, per-element figures weighted by elements, the most registers and spills and the
    fewest resident warps of its binaries, the first launch's config."""
    calls: dict[tuple, dict] = {}
    for launch, facts, cost in costs:
        key = (launch.kernel_name, _operands(launch), launch.case.split(" | ")[0])
        if "error" in cost or "error" in calls.get(key, {}):
            calls[key] = dict(kernel=key[0], operands=key[1], case=key[2], config=launch.config,
                              error=cost.get("error") or calls[key]["error"])
            continue
        total = calls.setdefault(key, dict(kernel=key[0], operands=key[1], case=key[2], config=launch.config,
                                           launches=0, registers=0, spills=0, hgmma=facts.hgmma, hmma=facts.hmma,
                                           warps_per_sm=64, static_sass=facts.instructions))
        total["launches"] += 1
        total["registers"] = max(total["registers"], facts.registers)
        total["spills"] = max(total["spills"], facts.spills)
        total["warps_per_sm"] = min(total["warps_per_sm"], cost["warps_per_sm"])
        for name, value in cost.items():
            if name.endswith("per_element"):
                total["_" + name] = total.get("_" + name, 0.0) + value * cost["elements"]
            elif name != "warps_per_sm":
                total[name] = total.get(name, 0.0) + value
    for total in calls.values():
        for name in [k for k in total if k.startswith("_")]:
            total[name[1:]] = total.pop(name) / total["elements"]
    return list(calls.values())


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
    costs: list = []
    rows = run(launches, args.workers, costs)
    seconds = time.perf_counter() - start
    print_table(rows)
    failed = [r for r in rows if r.problems]
    print(f"\n{len(launches)} launches, {len(rows)} distinct compiles for sm_90 in {seconds:.0f} s "
          f"(triton {triton.__version__}); {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "seconds": seconds, "quick": args.quick,
                       "rows": [asdict(r) | {"problems": r.problems} for r in rows],
                       "costs": aggregate_costs(costs)}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_command(_COMMAND_LINE))
