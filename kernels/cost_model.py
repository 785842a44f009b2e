"""What one call of a fused op moves and computes, priced at stated ceilings: predictions, to be held against
the times the acceptance run measures (it prints both side by side).

    python -m kernels.cost_model                       # both ops at the ViT-Ti shapes, H100 and H200
    python -m kernels.cost_model --l2-tbps 7.2         # with the L2 bandwidth a probe measured
    (`python -m kernels.bench` on a GPU prices it at that GPU's measured ceilings, L2 probe included)
    python -m kernels.cost_model --json PATH           # also write every row as JSON

No GPU and no compiler are needed: the launches, grids and tiles come from the ops' own config pickers and
chunking rules, so a change of tiles changes the prediction. For every launch of one call, forward and
backward, the model counts
- L2 -> SM bytes: what each program loads (and stores) tile by tile, times the programs. This is what the
  datasheet floor leaves out: a tile that several programs (or several loop steps) load again is read from L2
  each time, and at the L2's few TB/s that, not HBM, limits these tiles;
- compulsory HBM bytes: each tensor read or written once;
- tensor-core FLOPs as executed (padded tiles included), at the rate of the wgmma shape the tile gives
  (`wgmma_efficiency`);
- waves: programs over SMs x resident programs per SM; the last, partial wave costs a whole one;
- the library calls (cuBLAS GEMMs; a GEMM whose output has fewer tiles than there are SMs leaves SMs idle)
  and the small torch ops between the kernels (casts, reductions of partials), each at least SMALL_OP_S.
A launch's time is the largest of its HBM, L2 and tensor-core times, times its tail factor, and at least
SMALL_OP_S; an op's time is the sum over its launches. "before" prices the kernels as they were (each
pattern's dot reloading the weight tile, the relation forward reloading its row tile per column block), so
before and after stand on one scale.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch
import triton

from dpal.config import DecoderSpec
from dpal.decoder import LAYER_NORM_EPS
from kernels import decoder_experts as dec, relation_loss as rel
from kernels._common import resident_programs
from kernels.floors import decoder_bytes, decoder_flops, relation_bytes, relation_flops

# Stated ceilings, measured on the GPUs the acceptance run uses (device-to-device copy, read + write; a bf16
# 8192^3 cuBLAS GEMM) and from the datasheet (SMs). The L2 -> SM bandwidth has no datasheet figure:
# L2_ASSUMED is the low end of published microbenchmarks, replaced by the bench's probe where it runs.
L2_ASSUMED = 5.5e12
STATED = {"H100": dict(hbm=3.0e12, gemm=798e12), "H200": dict(hbm=4.3e12, gemm=788e12)}
SMS = 132  # H100 SXM and H200 alike


@dataclass(frozen=True)
class Machine:
    name: str
    hbm: float  # bytes/s
    gemm: float  # bf16 FLOP/s
    l2: float  # L2 -> SM bytes/s
    sms: int
    source: str  # where the ceilings come from ("stated; L2 assumed", "stated; L2 given", "measured on ...")


def machines(l2: float | None = None, ceilings: dict | None = None, name: str = "") -> list[Machine]:
    """The machines a prediction is priced on: the H100 and H200 at their stated ceilings and the L2 bandwidth
    `l2` (default L2_ASSUMED); or, given `ceilings` (the bench's `measure_ceilings` on a GPU: copy GB/s,
    matmul TFLOP/s, L2 read GB/s of its probe, SMs), the one GPU `name` they were measured on."""
    if ceilings is not None:
        return [Machine(name, ceilings["copy_gbps"] * 1e9, ceilings["matmul_tflops"] * 1e12,
                        ceilings["l2_gbps"] * 1e9, ceilings["sms"], f"measured on {name}")]
    source = "stated; L2 " + ("given" if l2 else "assumed")
    return [Machine(gpu, **rates, l2=l2 or L2_ASSUMED, sms=SMS, source=source) for gpu, rates in STATED.items()]


# A small op (cast, reduction of partials, fill) costs at least this: a kernel's launch and ramp on a busy
# stream. Any launch costs at least as much.
SMALL_OP_S = 2e-6
BF16 = 2  # bytes per operand element (the recipes train under bf16 autocast)
F32 = 4
TARGET_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def wgmma_efficiency(n: int) -> float:
    """Share of the tensor cores' rate a wgmma m64nNk16 reaches when both operands come from shared memory:
    it does 2 * 64 * N * 16 FLOPs in N / 2 clocks at the dense rate (4,096 bf16 FLOPs per clock per SM) but
    reads (N + 64) * 16 * 2 bytes of shared memory at 128 bytes per clock, so below N = 64 it waits on
    shared memory: 1 at N >= 64, 2/3 at 32, 0.4 at 16, 0.22 at 8."""
    return min(1.0, 64.0 * n / (32.0 * n + 2048.0))


def wgmma_n(rows: int, columns: int, warps: int) -> int:
    """The N of the wgmma a [rows, columns] fp32 accumulator gives: one warpgroup (4 warps) per 64 rows, the
    warpgroups left over splitting the columns."""
    return max(8, columns // max(1, warps // 4 // max(1, rows // 64)))


@dataclass
class Launch:
    op: str
    name: str
    programs: int  # Triton programs; for a library GEMM its calls, for small ops their count
    per_sm: int  # programs resident per SM
    l2_bytes: float  # L2 -> SM bytes of the whole launch (what its programs load and store)
    hbm_bytes: float
    flops: float = 0.0  # executed tensor-core FLOPs
    wgmma: int = 0  # N of the wgmma m64nNk16 (0: no tensor cores)
    gemm_tiles: int = 0  # 128 x 128 output tiles of each library GEMM call (0: not a library GEMM)
    small: bool = False  # small torch ops, each priced SMALL_OP_S at least

    def seconds(self, m: Machine) -> dict:
        """Per part (hbm, l2, tensor; seconds), waves over the SMs, and the launch's predicted seconds."""
        efficiency = wgmma_efficiency(self.wgmma) if self.wgmma else 1.0
        if self.gemm_tiles:  # cuBLAS: one CTA per output tile, so fewer tiles than SMs leave SMs idle
            efficiency = min(1.0, self.gemm_tiles / m.sms)
        parts = dict(hbm=self.hbm_bytes / m.hbm, l2=self.l2_bytes / m.l2, tensor=self.flops / (m.gemm * efficiency))
        waves = self.programs / (m.sms * self.per_sm)
        if self.small or self.gemm_tiles:
            return dict(parts, waves=0.0, seconds=max(self.programs * SMALL_OP_S, max(parts.values())))
        # The last wave costs a whole one; a grid smaller than the SMs leaves the rest idle.
        tail = math.ceil(waves) / waves if waves >= 1 else m.sms / min(m.sms, self.programs)
        return dict(parts, waves=waves, seconds=max(SMALL_OP_S, max(parts.values()) * tail))


def small_ops(op: str, count: int, nbytes: float = 0.0) -> Launch:
    return Launch(op, f"{count} small torch ops", count, 1, 0.0, nbytes, small=True)


# ----------------------------------------------------------------------------------------------- decoder

def decoder_launches(batch: int, dim: int, out_dim: int, tokens: int, *, before: bool) -> list[Launch]:
    """One decoder call (forward + backward) of the fused expert path at bf16: the Triton kernels of the op's
    launch plan (`decoder_experts.expert_plan`, the one the op issues and the sweep compiles), the output stage
    and the small ops. `before`: the kernels as they were before they were priced by what they move (every
    column tile loading its queries again and every pattern's dot the weight tile again, `_pass_launch`;
    backward's du made in column chunks, each consumed by two cuBLAS GEMMs, `_chunked_du_launches`)."""
    op, patterns, features = "decoder", DecoderSpec.num_patterns, dim * out_dim
    rows = batch * patterns
    expert = dec.expert_plan(batch, patterns, dim, out_dim, torch.bfloat16, torch.float32, DecoderSpec.mix_divisor,
                             DecoderSpec.experts_loss_weight, LAYER_NORM_EPS, SMS)
    plan = []
    for planned in expert["forward"] + expert["backward"]:
        name = planned.kernel_name
        programs, c = math.prod(planned.grid), planned.config
        if name in dec.PER_SAMPLE_KERNELS:  # per sample: the merge reads its tile means twice and M2 once
            n_tiles = triton.cdiv(features, _BEFORE_PASS_TILE["BLOCK_M"]) if before else planned.scalars["n_tiles"]
            partials = n_tiles * (3 * patterns if name == "expert_stats_merge" else patterns + 2)
            plan.append(Launch(op, name, programs, PER_SAMPLE_PROGRAMS_PER_SM, partials * F32 * programs,
                               partials * F32 * programs))
            continue
        if name in dec.FLAT_KERNEL_NAMES:
            if before:
                if name == "expert_weight_grad":
                    plan += _chunked_du_launches(batch, dim, out_dim)
                continue
            plan.append(_flat_launch(planned, batch, dim, out_dim))
            continue
        plan.append(_pass_launch(name, batch, dim, out_dim, planned.grid, c, before))
    z = batch * tokens * out_dim * BF16
    h = batch * tokens * dim * BF16
    mixed = batch * features * BF16
    gemm_tiles = batch * triton.cdiv(tokens, 128) * triton.cdiv(out_dim, 128)
    flops = 2.0 * batch * tokens * dim * out_dim
    plan.append(Launch(op, "cuBLAS output bmm (forward)", 1, 1, 0.0, h + mixed + z, flops, gemm_tiles=gemm_tiles))
    # The row kernels: forward reads z and writes y, each program reading the LayerNorm's weight and bias;
    # backward reads z and dy and writes dz, each program reading the weight and writing its dw, db partials.
    params = out_dim * F32
    programs = triton.cdiv(batch * tokens, dec.ROW_BLOCK)
    plan.append(Launch(op, "gelu_layer_norm_fwd", programs, 8, 2 * z + 2 * params * programs, 2 * z))
    kept = not before and dec.keeps_output(tokens, dim)  # backward copies z instead of recomputing it
    calls = 3 - kept
    plan.append(Launch(op, f"cuBLAS output bmm (backward: {'dh, dW_b' if kept else 'recompute, dh, dW_b'})", calls,
                       1, 0.0, calls * (h + mixed + z), calls * flops, gemm_tiles=gemm_tiles))
    programs, _ = dec.row_programs(batch * tokens, out_dim, SMS)
    plan.append(Launch(op, "gelu_layer_norm_bwd", programs, dec.row_bwd_programs_per_sm(out_dim),
                       3 * z + 3 * params * programs, 3 * z))
    if before:  # the weight cast, then each chunk's dW copied out as float32
        chunks = triton.cdiv(features, _chunk_columns(batch, patterns, features))
        plan.append(small_ops(op, 2 + 4 + chunks, 2 * (F32 + BF16) * features * dim))
    else:  # the weight cast; summing dq's slices in float32 and casting dq; summing the per-column partials
        row_blocks, slices = expert["backward"][-1].grid
        sample_blocks = expert["backward"][0].grid[0]
        plan.append(small_ops(op, DECODER_SMALL_OPS + kept, (F32 + BF16) * features * dim
                              + (slices + 1) * rows * dim * F32 + rows * dim * (F32 + BF16)
                              + (2 * sample_blocks + row_blocks + 3) * features * F32 + 2 * kept * z))
    return plan


def _pass_launch(name: str, batch: int, dim: int, out_dim: int, grid: tuple, config, before: bool) -> Launch:
    """A pass over (samples x column tiles) with one accumulator per pattern (`expert_stats`, `expert_mix`,
    `expert_grad_stats`). After: each program holds its BLOCK_B samples' queries (all patterns; loaded again for
    each tile unless HOLD_QUERIES) and walks its slice of column tiles, per tile loading the W tile once for the
    P dots, the small per-column vectors and what the pass reads or writes per element (W_b written by mix; dW_b
    and W_b read by grad_stats; after, also sum_e c_e xhat_e written by mix and read by grad_stats in place of
    W_b, dW gamma written by grad_stats, and its two per-column partials per tile). Before: one program per
    (sample block, column tile) of _BEFORE_PASS_TILE, reloading its queries for each tile and the W tile for
    each pattern."""
    patterns, features = DecoderSpec.num_patterns, dim * out_dim
    if before:
        bb, bm, warps = _BEFORE_PASS_TILE["BLOCK_B"], _BEFORE_PASS_TILE["BLOCK_M"], _BEFORE_PASS_TILE["warps"]
        row_blocks, tiles = triton.cdiv(batch, bb), triton.cdiv(features, bm)
        programs, tiles_per_program, w_loads = row_blocks * tiles, 1, patterns
    else:
        bb, bm, warps = config["BLOCK_B"], config["BLOCK_M"], config.num_warps
        row_blocks, tiles = grid[0], triton.cdiv(features, bm)
        programs, tiles_per_program, w_loads = math.prod(grid), tiles / grid[1], 1
    query_loads = 1 if before or config["HOLD_QUERIES"] else tiles_per_program
    per_element = {"expert_stats": 0, "expert_mix": 1 if before else 2, "expert_grad_stats": 2 if before else 3}
    tile_io = per_element[name] * bb * bm * BF16
    column_partials = 2 * bm * F32 if name == "expert_grad_stats" and not before else 0
    per_program = (bb * patterns * dim * BF16 * query_loads
                   + tiles_per_program * (bm * dim * BF16 * w_loads + tile_io + 3 * bm * F32 + column_partials))
    hbm = features * dim * BF16 + batch * patterns * dim * BF16 + tile_io // (bb * bm) * batch * features
    hbm += row_blocks * features * column_partials // bm
    return Launch("decoder", name, programs, resident_programs(warps), per_program * programs, hbm,
                  2.0 * row_blocks * bb * patterns * tiles * bm * dim, wgmma_n(bb, bm, warps))


# The passes before: one 8-warp program per 64 samples x 128 columns.
_BEFORE_PASS_TILE = dict(BLOCK_B=64, BLOCK_M=128, warps=8)


def _flat_launch(planned, batch: int, dim: int, out_dim: int) -> Launch:
    """A flat backward pass (`expert_weight_grad` or `expert_query_grad`): per program, the operand it holds
    (BLOCK_M weight rows, or BLOCK_R query rows) once, then per step of its loop (every block of query rows,
    or its slice's column tiles) the other operand's tile, dW gamma at the rows' samples (bf16, as grad_stats
    stored it) and the small per-row or per-column vectors (the query-gradient pass also stores its rows' bias
    partial per column tile); it writes its gradient (dW_expert rows float32, or its float32 dq slice). Two GEMMs
    (u, then dW or dq) per step."""
    name, c = planned.kernel_name, planned.config
    patterns, features = DecoderSpec.num_patterns, dim * out_dim
    rows = batch * patterns
    programs = math.prod(planned.grid)
    br, bm = c["BLOCK_R"], c["BLOCK_M"]
    scaled_grad = br * bm * BF16  # a tile of dW gamma
    if name == "expert_weight_grad":
        steps = triton.cdiv(rows, br)
        per_program = (bm * dim * BF16 + bm * F32 + steps * (br * dim * BF16 + scaled_grad + 4 * br * F32)
                       + bm * dim * F32)
        hbm = features * dim * (BF16 + F32) + rows * dim * BF16 + batch * features * BF16
    else:
        slices = planned.grid[1]
        steps = triton.cdiv(features, bm) / slices
        per_program = (br * dim * BF16 + 4 * br * F32 + steps * (bm * dim * BF16 + scaled_grad + 2 * bm * F32)
                       + br * dim * F32)
        hbm = (features * dim * BF16 + rows * dim * BF16 + batch * features * BF16 + slices * rows * dim * F32
               + planned.grid[0] * features * F32)
    executed = 2 * 2.0 * programs * steps * br * bm * dim
    return Launch("decoder", name, programs, resident_programs(c.num_warps), per_program * programs, hbm, executed,
                  wgmma_n(br, bm, c.num_warps))


# The kernels before: backward's du pass made du [3B, chunk] in bf16 chunks of at most 2^24 values (a multiple
# of 128 columns), with 8-warp programs of 64 samples x 32 columns walking every block of samples, each chunk
# consumed by a cuBLAS dq GEMM ([3B, chunk] @ [chunk, D]) and dW GEMM ([chunk, 3B] @ [3B, D]).
_BEFORE_CHUNK_ELEMENTS = 1 << 24
_BEFORE_DU_TILE = dict(BLOCK_B=64, BLOCK_M=32, warps=8)


def _chunk_columns(batch: int, patterns: int, features: int) -> int:
    return min(features, max(128, _BEFORE_CHUNK_ELEMENTS // (batch * patterns) // 128 * 128))


def _chunked_du_launches(batch: int, dim: int, out_dim: int) -> list[Launch]:
    op, patterns, features = "decoder", DecoderSpec.num_patterns, dim * out_dim
    rows = batch * patterns
    queries = rows * dim * BF16
    bb, bm, warps = _BEFORE_DU_TILE["BLOCK_B"], _BEFORE_DU_TILE["BLOCK_M"], _BEFORE_DU_TILE["warps"]
    row_blocks = triton.cdiv(batch, bb)
    chunk = _chunk_columns(batch, patterns, features)
    plan = []
    for start in range(0, features, chunk):
        cols = min(chunk, features - start)
        programs = triton.cdiv(cols, bm)
        per_program = row_blocks * (bm * dim * BF16 * patterns + bb * patterns * dim * BF16 + 2 * bb * bm * BF16
                                    + bb * patterns * bm * BF16)
        plan.append(Launch(op, "expert_grad", programs, resident_programs(warps), per_program * programs,
                           cols * dim * BF16 + queries + 2 * batch * cols * BF16 + rows * cols * BF16,
                           2.0 * row_blocks * bb * patterns * programs * bm * dim, wgmma_n(bb, bm, warps)))
        for gemm, out_rows, k in (("dq", rows, cols), ("dW", cols, rows)):
            plan.append(Launch(op, f"cuBLAS {gemm} GEMM", 1, 1, 0.0, (out_rows * dim + out_rows * k + k * dim) * BF16,
                               2.0 * out_rows * dim * k, gemm_tiles=triton.cdiv(out_rows, 128) * triton.cdiv(dim, 128)))
    return plan


# The small torch ops of one decoder call besides the kernels and GEMMs above, as an op trace of the call
# lists them: forward 2 (casting the float32 expert weight, summing the loss partials), backward 5 (summing the
# partials of the output LayerNorm's parameter gradients, of LN_E's and of the expert bias's, summing dq's
# slices in float32, casting dq); one more where backward copies the kept z instead of recomputing it.
DECODER_SMALL_OPS = 7
# The per-sample kernels (4 warps, a few registers) fit many to an SM.
PER_SAMPLE_PROGRAMS_PER_SM = 16


# ---------------------------------------------------------------------------------------------- relation

def relation_launches(batch: int, n: int, dim: int, target: str, *, before: bool) -> list[Launch]:
    """One relation call (forward + backward) at bf16 with `target` ("fp16" or "int8") targets. `before`:
    the forward reloads its row tile for every column block, and torch ops finish the loss."""
    op, t = "relation", TARGET_BYTES[target]
    c = rel.pick_config("fwd", n, dim, "bf16")
    bi, bj = c["BLOCK_I"], c["BLOCK_J"]
    tail = rel.tail_block(n, bj)
    blocks = n // bj + bool(tail)
    row_tile_loads = blocks if before else 1
    programs = triton.cdiv(n, bi) * batch
    per_program = bi * dim * BF16 * row_tile_loads + n * dim * BF16 + bi * n * t + 4 * bi * F32
    y, targets = batch * n * dim * BF16, batch * n * n * t
    executed = 2.0 * programs * bi * (n // bj * bj + tail) * dim
    plan = [Launch(op, "relation_kl_fwd", programs, resident_programs(c.num_warps), per_program * programs,
                   y + targets, executed, wgmma_n(bi, bj, c.num_warps))]
    c = rel.pick_config("bwd", n, dim, "bf16")
    block = c["BLOCK_I"]
    tail = rel.tail_block(n, block)
    for pairs, width in zip(rel.tile_pairs(n, block, tail), (block, tail)):
        if pairs:
            tiles = 2 * block * width * (t + BF16)  # p_IJ and p_JI read, the gradient and its transpose written
            per_pair = (block + width) * dim * BF16 + tiles
            programs = len(pairs) * batch
            plan.append(Launch(op, "relation_kl_bwd" + (" (tail)" if width == tail else ""), programs,
                               resident_programs(c.num_warps), per_pair * programs, tiles * programs + y / 2,
                               2.0 * programs * block * width * dim, wgmma_n(block, width, c.num_warps)))
    plan.append(Launch(op, "cuBLAS dY = G Y", 1, 1, 0.0, batch * (n * n + 2 * n * dim) * BF16,
                       2.0 * batch * n * n * dim, gemm_tiles=batch * triton.cdiv(n, 128) * triton.cdiv(dim, 128)))
    if before:
        plan.append(small_ops(op, _BEFORE_RELATION_SMALL_OPS[target == "int8"], 16 * batch * n))
    else:
        plan.append(small_ops(op, RELATION_SMALL_OPS, F32 * batch * n))
    return plan


# Small torch ops of one relation call, forward and backward, as an op trace lists them: the sum of the rows'
# shares of the loss. Before: 10 with float targets, 15 with int8 codes (finishing the loss and the int8 rows'
# normaliser from the forward's per-row values, scaling the incoming gradient, the tile-pair tables' copies).
RELATION_SMALL_OPS = 1
_BEFORE_RELATION_SMALL_OPS = (10, 15)

# The calls reported: the targets at ViT-Ti shapes (B = 256, decoder D = 192, D_o = 768, relation
# N = 257 teacher tokens).
CALLS = {"decoder B256 L257": ("decoder", (256, 192, 768, 257)),
         "decoder CLS B768 L1": ("decoder", (768, 192, 768, 1)),
         "relation fp16 targets": ("relation", (256, 257, 768, "fp16")),
         "relation int8 targets": ("relation", (256, 257, 768, "int8"))}


def launches_of(op: str, shape: tuple, before: bool = False) -> list[Launch]:
    """The launches of one call of `op` ("decoder": (B, D, D_o, L); "relation": (B, N, D, target))."""
    return (decoder_launches if op == "decoder" else relation_launches)(*shape, before=before)


def plan(call: str, before: bool) -> list[Launch]:
    return launches_of(*CALLS[call], before=before)


def floor_counts(op: str, shape: tuple) -> tuple[float, float]:
    """(useful FLOPs, compulsory bytes) of one call, `kernels.floors`' counts."""
    if op == "decoder":
        return decoder_flops(*shape), decoder_bytes(*shape, BF16)
    batch, n, dim, target = shape
    return relation_flops(batch, n, dim), relation_bytes(batch, n, dim, BF16, TARGET_BYTES[target])


def executed_flops(op: str, shape: tuple, before: bool = False) -> float:
    """The tensor-core FLOPs one call's launches execute: recomputes, padded tiles and library GEMMs included."""
    return sum(launch.flops for launch in launches_of(op, shape, before))


def predict(op: str, shape: tuple, m: Machine, before: bool = False) -> dict:
    """One call priced on `m`: the whole (predicted and floor ms, their ratio, launches counted as kernels,
    library calls and small ops, L2 -> SM GB, and the least ms) and its launches, each with its parts.

    floor: the call's useful FLOPs at the GEMM rate or its compulsory bytes at the HBM rate, whichever is
    larger (`floor_counts`).

    least: the FLOPs the launches execute at the dense GEMM rate, or the call's compulsory bytes at the HBM
    rate, whichever is larger; what these launches take if nothing else cost anything (every wgmma at full
    rate, no L2 limit, no tail, no launch cost). No tiling of the same work beats it: a target below it needs
    less work (fewer recomputes), not better tiles."""
    launches = launches_of(op, shape, before)
    priced = [launch.seconds(m) for launch in launches]
    useful, compulsory = floor_counts(op, shape)
    total, floor = sum(p["seconds"] for p in priced), max(useful / m.gemm, compulsory / m.hbm)
    least = max(sum(launch.flops for launch in launches) / m.gemm, compulsory / m.hbm)
    return dict(gpu=m.name, launches=sum(launch.programs if launch.small or launch.gemm_tiles else 1
                                         for launch in launches),
                l2_gb=sum(launch.l2_bytes for launch in launches) / 1e9, predicted_ms=1e3 * total,
                floor_ms=1e3 * floor, ratio=total / floor, least_ms=1e3 * least, least_ratio=least / floor,
                parts=[dict(asdict(launch), **p) for launch, p in zip(launches, priced)])


def report(gpus: list[Machine] | None = None) -> dict:
    """Every call of CALLS, before and after, on each of `gpus` (default: `machines()`): "totals", one row per
    call, kernels and GPU; "rows", the launches on the first GPU."""
    gpus = gpus or machines()
    rows, totals = [], []
    for call, (op, shape) in CALLS.items():
        for before in (True, False):
            kernels = "before" if before else "after"
            for m in gpus:
                priced = predict(op, shape, m, before)
                if m is gpus[0]:
                    rows += [dict(call=call, kernels=kernels, **part) for part in priced.pop("parts")]
                else:
                    del priced["parts"]
                totals.append(dict(call=call, kernels=kernels, **priced))
    return dict(machines=[asdict(m) for m in gpus], rows=rows, totals=totals)


def print_report(result: dict) -> None:
    gpus = result["machines"]
    print("PREDICTED (not measured) by kernels.cost_model: one call, forward + backward, bf16; ceilings "
          + "; ".join(f"{m['name']} ({m['source']}): HBM {m['hbm'] / 1e12:.2f} TB/s, GEMM {m['gemm'] / 1e12:.0f} "
                      f"TFLOP/s, L2 -> SM {m['l2'] / 1e12:.2f} TB/s" for m in gpus))
    print("ratio: predicted / floor; least: the launches' executed tensor-core FLOPs at the dense GEMM rate or the "
          "compulsory bytes at HBM's, whichever is larger (no tiling of the same work beats it)")
    print(f"{'call':24} {'kernels':7} {'gpu':10} {'launches':>8} {'L2 GB':>6} {'floor ms':>8} {'pred ms':>8} "
          f"{'ratio':>5} {'least ms':>8} {'ratio':>5}")
    for t in result["totals"]:
        print(f"{t['call']:24} {t['kernels']:7} {t['gpu'][:10]:10} {t['launches']:8} {t['l2_gb']:6.2f} "
              f"{t['floor_ms']:8.3f} {t['predicted_ms']:8.3f} {t['ratio']:5.2f} {t['least_ms']:8.3f} "
              f"{t['least_ratio']:5.2f}")
    print(f"\nper launch, {gpus[0]['name']} (predicted ms; waves over {gpus[0]['sms']} SMs; bound: the largest part)")
    print(f"{'call':24} {'kernels':7} {'launch':34} {'progs':>6} {'waves':>6} {'wgmma':>6} {'L2 GB':>6} "
          f"{'hbm':>6} {'l2':>6} {'tensor':>6} {'ms':>6}")
    for r in result["rows"]:
        shape = f"64x{r['wgmma']}" if r["wgmma"] else "-"
        print(f"{r['call']:24} {r['kernels']:7} {r['name'][:34]:34} {r['programs']:6} {r['waves']:6.2f} "
              f"{shape:>6} {r['l2_bytes'] / 1e9:6.2f} {1e3 * r['hbm']:6.3f} {1e3 * r['l2']:6.3f} "
              f"{1e3 * r['tensor']:6.3f} {1e3 * r['seconds']:6.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.cost_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--l2-tbps", type=float, default=None,
                        help=f"L2 -> SM bandwidth in TB/s (default {L2_ASSUMED / 1e12}: assumed, not measured)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and totals as JSON to PATH")
    args = parser.parse_args(argv)
    if args.l2_tbps is not None and not args.l2_tbps > 0:
        parser.error(f"--l2-tbps must be > 0, got {args.l2_tbps}")
    result = report(machines(args.l2_tbps and args.l2_tbps * 1e12))
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
