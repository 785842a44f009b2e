"""Benchmark of the fused ops against eager and torch.compile'd references: `python -m kernels.bench`.

For every decoder and relation call a recipe's training step makes (`kernels.shapes`, at the recipe's batch per
GPU; bf16 activations and fp32 parameters under bf16 autocast, as training runs, so the expert weight's cast is
timed too; relation inputs as `relation_inputs` draws them, a KL of 0.01 to 1 per row) it times
forward+backward (median, triton.testing.do_bench),
measures peak memory, and reports achieved TFLOP/s and GB/s against ceilings measured on the same device
(a large bf16 matmul, a large copy, and the L2 -> SM read bandwidth: `kernels.l2_probe`). Every fused row
carries `kernels.cost_model`'s prediction for its call priced at those measured ceilings (`predicted_ms`,
and measured / predicted), printed next to the measurement. It prints a table, a table of analytic floors at
the ViT-Ti target shapes, the cost model's report (each call whole and per launch; on a GPU at its measured
ceilings, without one at the stated ceilings and labelled PREDICTED), and writes everything as JSON with
--json. Without a GPU it runs the same code in Triton's interpreter at toy shapes and says so: those timings
measure the interpreter, not the kernels, and no prediction stands beside them.

On a GPU the implementations are: `eager` and `compile` (the reference in float32, as the plain method
runs), `eager_autocast` and `compile_autocast` (the reference under bf16 autocast, as training runs it: the
speed target is against `compile_autocast`), and `fused` (under autocast). Every row also carries its
accuracy: the largest error of its outputs and input gradients against the reference evaluated in float64
on the same inputs, relative to that output's largest magnitude (`max_rel_err`), and whether any NaN or
infinity came out (`nan`).

It also prints the compile facts that need no GPU: each kernel at the ViT-Ti shapes compiled for sm_90
(`kernels.sweep --quick`), with registers, resident warps per SM, spills, wgmma counts, executed SASS and
MUFU instructions per element (static counts per loop nest times trip counts), and the check of the cost
model's L2 -> SM bytes per program against each launch's SASS (JSON key "static"). Predictions are the cost
model's only (JSON key "predictions").

FLOPs are the useful GEMM FLOPs (forward, plus twice that for backward) — what any implementation must do;
the fused ops execute more (they recompute instead of storing): the floors table reports both, the executed
count from the cost model's launch plans.
Bytes are the compulsory traffic of an implementation that keeps only W_b (decoder) or nothing N x N
(relation) between forward and backward; see `kernels.floors`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from runtime.arguments import POSITIVE, output_file
from dpal.recipes import RECIPES
from kernels.shapes import TARGET_RECIPE

IMPLEMENTATIONS = ("eager", "compile", "eager_autocast", "compile_autocast", "fused")  # table order


def _names(text: str, known, what: str) -> list[str]:
    """A comma-separated list of `known` names, refused in one line when one is unknown."""
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                                         f"known: {', '.join(map(str, known))}")
    return names


def command_line() -> argparse.ArgumentParser:
    """The options (light: no torch, so that --help and a bad option answer at once)."""
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", type=output_file, help="also write the results as JSON to PATH "
                        "(its folder must exist), rewritten after every row (a run cut short keeps every row measured "
                        "before)")
    parser.add_argument("--op", choices=("all", "decoder", "relation"), default="all", help="which op to time")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="only the calls this recipe makes (default: every recipe's); on a GPU, "
                             f"{TARGET_RECIPE} holds the speed and memory targets")
    parser.add_argument("--tokens", type=lambda text: [int(t) for t in text.split(",")], metavar="L,...",
                        help="only the decoder calls with these token counts (default: all)")
    parser.add_argument("--impls", type=lambda text: _names(text, IMPLEMENTATIONS, "implementation"),
                        metavar="NAME,...", help=f"only these of {', '.join(IMPLEMENTATIONS)} (default: all)")
    parser.add_argument("--batch", type=POSITIVE, default=None,
                        help="samples per GPU (>= 1; default: each recipe's on a GPU, 2 in the interpreter)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile'd reference (compiling every shape takes minutes)")
    parser.add_argument("--reps", type=POSITIVE, default=3,
                        help="timed repetitions without a GPU (>= 1, default 3; GPU: do_bench)")
    parser.add_argument("--no-static", action="store_true",
                        help="skip the compile facts (registers, spills, SASS per element, the cost model's bytes "
                             "against the SASS, from the sm_90 cubins; compiling takes a minute)")
    return parser


if __name__ == "__main__":  # read before torch is imported: --help and a bad option answer at once
    _COMMAND_LINE = command_line().parse_args()

import torch  # noqa: E402

from dpal.decoder import LAYER_NORM_EPS, expert_path_reference  # noqa: E402
from dpal.losses import quantize_relation, relation_kl_reference, relation_matrix  # noqa: E402
from kernels import select_interpreter, shapes  # noqa: E402
from kernels.floors import PATTERNS, decoder_bytes, decoder_flops, relation_bytes, relation_flops  # noqa: E402

@dataclass
class Case:
    op: str
    shape: dict
    recipes: list[str]
    make_inputs: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor]]]  # (inputs, grads of outputs)
    impls: dict[str, Callable]
    reference: Callable  # the plain-PyTorch reference, evaluated in float64 for every row's accuracy
    flops: float  # useful GEMM FLOPs
    bytes: float


@dataclass
class Result:
    op: str
    shape: dict
    recipes: list[str]
    impl: str
    ms: float | None = None
    peak_mib: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    max_rel_err: float | None = None
    nan: bool | None = None
    predicted_ms: float | None = None  # kernels.cost_model at this device's measured ceilings (fused rows, GPU)
    measured_over_predicted: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def _decoder_inputs(batch, dim, out_dim, tokens, dtype, device, seed=0):
    """Activations (queries, h) in `dtype`; gate scores and parameters in float32, as training holds them
    under autocast, so every implementation pays for its cast of the expert weight to bf16."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(device, dt).requires_grad_()

    features = dim * out_dim
    inputs = [randn(batch, PATTERNS, dim, dt=dtype), torch.randn(batch, PATTERNS, generator=g).softmax(-1)
              .to(device).requires_grad_(), randn(batch, tokens, dim, dt=dtype), randn(features, dim, scale=dim ** -0.5),
              randn(features, scale=0.02), randn(features, scale=0.1).detach().add_(1).requires_grad_(),
              randn(features, scale=0.1), randn(out_dim, scale=0.1).detach().add_(1).requires_grad_(),
              randn(out_dim, scale=0.1)]
    grads = [torch.randn(batch, tokens, out_dim, generator=g).to(device, dtype), torch.ones((), device=device)]
    return inputs, grads


# Relation inputs as training sees them: the teacher's tokens are LayerNormed and strongly correlated (a shared
# per-sample direction plus a low-rank spread), so each row of softmax(T T^T / sqrt(D)) spreads over many
# tokens; the student's tokens are the teacher's with the spread perturbed. The spread is scaled with D so
# that the logits' spread, not D, sets the rows' shape: the KL per row lands in 0.01 to 1 at every shape.
# (Independent N(0, 1) tokens at D = 768 give a diagonal logit of sqrt(D) ~ 28 and one-hot rows, whose KL
# ~1e-9 float32 cannot resolve: `near_one_hot_relation_inputs`.)
RELATION_SPREAD_LOGIT = 2.5  # spread^2 * sqrt(D): the off-diagonal logits' spread, in nats
RELATION_RANK = 32
RELATION_STUDENT_NOISE = 0.7


def relation_inputs(batch: int, tokens: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(student tokens y [B, N, D], teacher relation probabilities [B, N, N]), float64 on the CPU."""
    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    spread = (RELATION_SPREAD_LOGIT / dim ** 0.5) ** 0.5
    shared, basis = draw(batch, 1, dim), draw(batch, RELATION_RANK, dim) / RELATION_RANK ** 0.5
    latent = draw(batch, tokens, RELATION_RANK)
    student_latent = latent + RELATION_STUDENT_NOISE * draw(batch, tokens, RELATION_RANK)
    teacher = torch.nn.functional.layer_norm(shared + spread * latent @ basis, (dim,))
    student = torch.nn.functional.layer_norm(shared + spread * student_latent @ basis, (dim,))
    return student, relation_matrix(teacher)


def near_one_hot_relation_inputs(batch: int, tokens: int, dim: int,
                                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent N(0, 1) tokens, the teacher a scaled copy of the student: each row is nearly one-hot at
    large D (diagonal logit ~ sqrt(D)), so the true KL per row is far below float32's resolution of it."""
    student = torch.randn(batch, tokens, dim, generator=generator, dtype=torch.float64)
    return student, relation_matrix(2 * student)


def _relation_inputs(batch, tokens, dim, dtype, target_format, device, seed=0):
    y, probs = relation_inputs(batch, tokens, dim, torch.Generator(device="cpu").manual_seed(seed))
    y = y.to(device, dtype).requires_grad_()
    probs = probs.float().to(device)
    if target_format == "int8":
        inputs = [y, *quantize_relation(probs)]
    else:
        inputs = [y, probs.to(getattr(torch, target_format)), None]
    return inputs, [torch.ones((), device=device)]


def _decoder_call(fn):
    def call(*inputs):
        y, loss = fn(*inputs, eps=LAYER_NORM_EPS)
        return [y, loss]
    return call


def _relation_call(fn):
    def call(y, target, scale):
        return [fn(y, target, scale)]
    return call


def _compiled(fn):
    """torch.compile'd fn specialised to the case's shapes: dynamo's caches are cleared first, so no case
    inherits a dynamic-shape graph from the previous one or runs eager past the recompile limit."""
    compiled = None

    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            torch._dynamo.reset()
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args, **kwargs)
    return call


def _under_autocast(fn):
    """fn run as training runs it on a GPU: under bf16 autocast (references and fused ops alike)."""
    def call(*args):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(*args)
    return call


def _cast_floats(fn, dtype):
    """fn with its floating-point tensor inputs cast to `dtype` (differentiably: gradients reach the leaves)."""
    def call(*args):
        return fn(*[a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    return call


def _implementations(reference, fused, on_gpu: bool, compile_refs: bool) -> dict[str, Callable]:
    """The implementations timed for one case; see the module docstring for what each name means."""
    if not on_gpu:  # the interpreter runs in float32 throughout: no autocast variants
        impls = {"eager": reference, "fused": fused}
        if compile_refs:
            impls["compile"] = _compiled(reference)
        return impls
    impls = {"eager": _cast_floats(reference, torch.float32), "eager_autocast": _under_autocast(reference),
             "fused": _under_autocast(fused)}
    if compile_refs:
        impls["compile"] = _cast_floats(_compiled(reference), torch.float32)
        impls["compile_autocast"] = _under_autocast(_compiled(reference))
    return impls


def build_cases(on_gpu: bool, batch: int | None, compile_refs: bool, device, recipes=None) -> list[Case]:
    """On a GPU: every decoder and relation call `distill_step_losses` makes for `recipes` (default: all; see
    `kernels.shapes`) at `batch` samples per GPU (default: each recipe's), the relation with fp16 and int8
    targets. In the interpreter: toy shapes that still have ragged tiles."""
    # Imported here, after main() has chosen how Triton runs them.
    from kernels.decoder_experts import expert_path
    from kernels.relation_loss import relation_kl

    dtype = torch.bfloat16 if on_gpu else torch.float32
    itemsize = torch.empty((), dtype=dtype).element_size()
    if on_gpu:
        decoder_calls = shapes.decoder_calls(batch, recipes)
        relation_calls = shapes.relation_calls(batch, recipes)
    else:
        toy_batch = batch or 2
        decoder_calls = {(toy_batch, PATTERNS, 24, 40, tokens): ["toy"] for tokens in (1, 9)}
        relation_calls = {(toy_batch, 70, 40): ["toy"], (toy_batch, 64, 24): ["toy"]}

    ref_decoder = _decoder_call(expert_path_reference)
    ref_relation = _relation_call(relation_kl_reference)
    cases = []
    for (rows, patterns, dim, out_dim, tokens), names in sorted(decoder_calls.items()):
        impls = _implementations(ref_decoder, _decoder_call(expert_path), on_gpu, compile_refs)
        cases.append(Case(
            "decoder", dict(batch=rows, dim=dim, out_dim=out_dim, tokens=tokens, dtype=str(dtype)), names,
            lambda r=rows, d=dim, o=out_dim, t=tokens: _decoder_inputs(r, d, o, t, dtype, device), impls, ref_decoder,
            decoder_flops(rows, dim, out_dim, tokens), decoder_bytes(rows, dim, out_dim, tokens, itemsize)))
    for (rows, tokens, dim), names in sorted(relation_calls.items()):
        for target_format in ("float16", "int8"):
            impls = _implementations(ref_relation, _relation_call(relation_kl), on_gpu, compile_refs)
            target_itemsize = 1 if target_format == "int8" else 2
            cases.append(Case(
                "relation", dict(batch=rows, tokens=tokens, dim=dim, dtype=str(dtype), target=target_format), names,
                lambda r=rows, t=tokens, d=dim, f=target_format: _relation_inputs(r, t, d, dtype, f, device),
                impls, ref_relation, relation_flops(rows, tokens, dim),
                relation_bytes(rows, tokens, dim, itemsize, target_itemsize)))
    return cases


def _time_ms(step, leaves, on_gpu, reps) -> float:
    if on_gpu:
        import triton.testing
        return float(triton.testing.do_bench(step, grad_to_none=leaves, return_mode="median"))
    step()  # warm-up (and the interpreter's first-call overhead)
    times = []
    for _ in range(reps):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _outputs_and_grads(fn, inputs, grads, dtype=None) -> list[torch.Tensor]:
    """fn's outputs and the gradients of its differentiable inputs, for upstream gradients `grads`; with
    `dtype`, on detached copies of the inputs whose floating-point tensors are cast to it."""
    if dtype is not None:
        inputs = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t is not None and t.is_floating_point()
                  else t for t in inputs]
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    outputs = fn(*inputs)
    torch.autograd.backward(outputs, [g.to(o.dtype) for o, g in zip(outputs, grads)])
    return [o.detach() for o in outputs] + [t.grad for t in leaves]


def accuracy(case: Case, impl: str, inputs, grads, exact: list[torch.Tensor]) -> tuple[float, bool]:
    """(largest error of impl's outputs and input gradients against `exact` (the float64 reference), each
    relative to the largest magnitude of its exact value; whether impl gave any NaN or infinity)."""
    got = _outputs_and_grads(case.impls[impl], inputs, grads)
    worst, nonfinite = 0.0, False
    for value, ref in zip(got, exact):
        value = value.double()
        nonfinite |= not bool(torch.isfinite(value).all())
        scale = ref.abs().max().item() or 1.0
        worst = max(worst, (value - ref).abs().max().item() / scale)
    return worst, nonfinite


def run_case(case: Case, impl: str, on_gpu: bool, reps: int) -> Result:
    result = Result(case.op, case.shape, case.recipes, impl)
    try:
        inputs, grads = case.make_inputs()
        leaves = [t for t in inputs if t is not None and t.requires_grad]
        fn = case.impls[impl]
        exact = _outputs_and_grads(case.reference, inputs, grads, dtype=torch.float64)
        result.max_rel_err, result.nan = accuracy(case, impl, inputs, grads, exact)
        del exact

        def step():
            outputs = fn(*inputs)
            torch.autograd.backward(outputs, [g.to(o.dtype) for o, g in zip(outputs, grads)])

        if on_gpu:
            step()
            for t in leaves:
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            result.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        result.ms = _time_ms(step, leaves, on_gpu, reps)
        seconds = result.ms / 1e3
        result.tflops = case.flops / seconds / 1e12
        result.gbps = case.bytes / seconds / 1e9
    except torch.cuda.OutOfMemoryError:
        result.error = "out of memory"
    except Exception as exc:  # noqa: BLE001 — one failing implementation must not hide the others' numbers
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:
        if on_gpu:
            torch.cuda.empty_cache()
    return result


def measure_ceilings(on_gpu: bool, device) -> dict:
    """Achievable matmul TFLOP/s and copy GB/s on this device (the denominators of the % columns); on a GPU
    also the L2 -> SM read GB/s of `kernels.l2_probe`, measured first, and the SMs: the ceilings the cost model
    prices this device at."""
    if on_gpu:
        import triton.testing

        from kernels.l2_probe import l2_read_bytes_per_s
        l2 = l2_read_bytes_per_s(device)
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        matmul_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
        src = torch.empty(2 ** 30, device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
        del a, b, src, dst
        torch.cuda.empty_cache()
        return {**l2, "matmul_tflops": 2 * n ** 3 / (matmul_ms / 1e3) / 1e12, "matmul": f"bf16 {n}^3",
                "copy_gbps": 2 * 2 ** 30 / (copy_ms / 1e3) / 1e9, "copy": "1 GiB"}
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    src = torch.empty(2 ** 27, dtype=torch.uint8)
    dst = torch.empty_like(src)
    matmul_s = min(_seconds(lambda: a @ b) for _ in range(5))
    copy_s = min(_seconds(lambda: dst.copy_(src)) for _ in range(5))
    return {"matmul_tflops": 2 * n ** 3 / matmul_s / 1e12, "matmul": f"fp32 {n}^3 (CPU)",
            "copy_gbps": 2 * 2 ** 27 / copy_s / 1e9, "copy": "128 MiB (CPU)"}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def target_floors(gpu) -> list[dict]:
    """FLOP and byte floors of the target recipe's calls (its batch, bf16) on `gpu`, a `kernels.cost_model.
    Machine`: this device's measured ceilings, or without a GPU the H100's stated ones. The fused FLOPs are
    what the fused ops' launches execute (`kernels.cost_model.executed_flops`: recomputes and padding in)."""
    from kernels import cost_model

    calls = RECIPES[TARGET_RECIPE].fused_calls()
    tflops, gbps = gpu.gemm / 1e12, gpu.hbm / 1e9
    rows = []
    for batch, tokens, dim, out_dim in calls.decoder:
        rows.append(dict(op="decoder", shape=f"B{batch} D{dim} Do{out_dim} L{tokens}",
                         gflop_useful=decoder_flops(batch, dim, out_dim, tokens) / 1e9,
                         gflop_fused=cost_model.executed_flops("decoder", (batch, dim, out_dim, tokens)) / 1e9,
                         mb=decoder_bytes(batch, dim, out_dim, tokens, 2) / 1e6))
    batch, tokens, dim = calls.relation
    for fmt, target, t_size in (("float16", "fp16", 2), ("int8", "int8", 1)):
        rows.append(dict(op="relation", shape=f"B{batch} N{tokens} D{dim} {fmt}",
                         gflop_useful=relation_flops(batch, tokens, dim) / 1e9,
                         gflop_fused=cost_model.executed_flops("relation", (batch, tokens, dim, target)) / 1e9,
                         mb=relation_bytes(batch, tokens, dim, 2, t_size) / 1e6))
    for row in rows:
        row["floor_ms_compute"] = row["gflop_useful"] / tflops
        row["floor_ms_fused_compute"] = row["gflop_fused"] / tflops
        row["floor_ms_memory"] = row["mb"] / gbps
        row["ceilings"] = f"{gpu.name}, {gpu.source} ({tflops:.0f} TF/s bf16, {gbps:.0f} GB/s)"
    return rows


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def print_table(results: list[Result], ceilings: dict, priced_on: str | None) -> None:
    """The measured rows; `priced_on`: the machine the fused rows' predictions are priced on (None: no GPU,
    no predictions)."""
    by_case: dict[str, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(json.dumps(r.shape, sort_keys=True) + r.op, {})[r.impl] = r
    header = (f"{'op':9} {'shape':44} {'impl':16} {'ms':>9} {'x compile':>9} {'peak MiB':>9} {'mem/eager':>9} "
              f"{'TFLOP/s':>8} {'%peak':>6} {'GB/s':>8} {'%copy':>6} {'rel err':>8} {'NaN':>3} {'pred ms':>8} "
              f"{'x pred':>6}")
    print(header)
    print("-" * len(header))
    for impls in by_case.values():
        # The speed target is against the compiled reference as training runs it (under autocast on a GPU).
        compiled, eager = impls.get("compile_autocast") or impls.get("compile"), impls.get("eager")
        for name in IMPLEMENTATIONS:
            r = impls.get(name)
            if r is None:
                continue
            shape = " ".join(f"{k}={v}" for k, v in r.shape.items() if k != "dtype")
            if r.error:
                print(f"{r.op:9} {shape:44} {name:16} error: {r.error}")
                continue
            speedup = compiled.ms / r.ms if compiled and compiled.ms and r.ms else None
            mem_ratio = r.peak_mib / eager.peak_mib if eager and eager.peak_mib and r.peak_mib is not None else None
            print(f"{r.op:9} {shape:44} {name:16} {r.ms:9.3f} {_fmt(speedup, '9.2f'):>9} "
                  f"{_fmt(r.peak_mib, '9.1f'):>9} {_fmt(mem_ratio, '9.2f'):>9} {r.tflops:8.3f} "
                  f"{100 * r.tflops / ceilings['matmul_tflops']:6.1f} {r.gbps:8.2f} "
                  f"{100 * r.gbps / ceilings['copy_gbps']:6.1f} {_fmt(r.max_rel_err, '8.1e'):>8} "
                  f"{'-' if r.nan is None else 'yes' if r.nan else 'no':>3} {_fmt(r.predicted_ms, '8.3f'):>8} "
                  f"{_fmt(r.measured_over_predicted, '6.2f'):>6}")
    print(f"ceilings: matmul {ceilings['matmul_tflops']:.2f} TFLOP/s ({ceilings['matmul']}), "
          f"copy {ceilings['copy_gbps']:.1f} GB/s ({ceilings['copy']})"
          + (f", L2 -> SM read {ceilings['l2_gbps']:.0f} GB/s ({ceilings['l2']})" if "l2_gbps" in ceilings else "")
          + "; x compile: against compile_autocast where timed; rel err: outputs and input gradients against float64")
    print(f"pred ms: kernels.cost_model's prediction for the fused call, priced at {priced_on}'s measured ceilings; "
          "x pred: measured / predicted" if priced_on else
          "pred ms: none without a GPU (the cost model's report below is PREDICTED at the stated ceilings, with "
          "the L2 -> SM bandwidth assumed: no probe ran)")


def print_floors(rows: list[dict]) -> None:
    print(f"\nfloors at the {TARGET_RECIPE} target shapes (bf16; ceilings: {rows[0]['ceilings']})")
    print(f"{'op':9} {'shape':28} {'GFLOP useful':>12} {'GFLOP fused':>11} {'MB':>8} "
          f"{'ms@peak':>8} {'fused ms@peak':>13} {'ms@copy':>8}")
    for r in rows:
        print(f"{r['op']:9} {r['shape']:28} {r['gflop_useful']:12.1f} {r['gflop_fused']:11.1f} {r['mb']:8.1f} "
              f"{r['floor_ms_compute']:8.3f} {r['floor_ms_fused_compute']:13.3f} {r['floor_ms_memory']:8.3f}")


def modelled_call(result: Result) -> tuple[str, tuple] | None:
    """(op, shape) of a fused row as `kernels.cost_model.predict` takes it, else None (the model prices the
    fused ops, in bf16)."""
    shape = result.shape
    if result.impl != "fused" or shape["dtype"] != str(torch.bfloat16):
        return None
    if result.op == "decoder":
        return "decoder", (shape["batch"], shape["dim"], shape["out_dim"], shape["tokens"])
    target = "fp16" if shape["target"] == "float16" else "int8"
    return "relation", (shape["batch"], shape["tokens"], shape["dim"], target)


def add_prediction(result: Result, gpu) -> None:
    """The cost model's prediction for a measured fused row, on `gpu` (this device at its measured ceilings)."""
    from kernels import cost_model

    call = modelled_call(result)
    if call is None or result.ms is None:
        return
    result.predicted_ms = cost_model.predict(*call, gpu)["predicted_ms"]
    result.measured_over_predicted = result.ms / result.predicted_ms


def static_report(sweep: dict | None = None) -> dict:
    """Compile facts of every kernel at the ViT-Ti shapes (batch 256, and the stacked CLS call at 768) and the
    check of the cost model's bytes against their SASS, from the sm_90 compile sweep: `sweep`, a `kernels.sweep
    --quick --json` report already made, or else one made in a child process (no GPU needed)."""
    if sweep is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sweep.json"
            done = subprocess.run([sys.executable, "-m", "kernels.sweep", "--quick", "--json", str(path)],
                                  env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True)
            if not path.exists():
                return {"error": f"kernels.sweep exited {done.returncode}: {done.stderr.strip()[-300:]}"}
            sweep = json.loads(path.read_text())
    return sweep


def print_static(report: dict) -> None:
    print("\ncompile facts at the path-b_vit-ti shapes, from the sm_90 cubins (no GPU; `make check-sm90` for all)")
    if "error" in report:
        print(f"  unavailable: {report['error']}")
        return
    print(f"{'kernel':20} {'operands':17} {'call':24} {'config':15} {'regs':>4} {'warps':>5} {'spill':>5} "
          f"{'HGMMA':>5} {'SASS/el':>7} {'MUFU/el':>7} {'GFLOP tensor':>12}")
    for c in report["executed"]:
        call = c["case"].replace(" Do768", "").replace(" D768", "")
        if "error" in c:
            print(f"{c['kernel']:20} {c['operands']:17} {call:24} {c['config']:15} loop model error: {c['error']}")
            continue
        print(f"{c['kernel']:20} {c['operands']:17} {call:24} {c['config']:15} {c['registers']:4} "
              f"{c['warps_per_sm']:5.0f} {c['spills']:5} {c['hgmma']:5} {c['sass_per_element']:7.1f} "
              f"{c['mufu_per_element']:7.2f} {c['tensor_flops'] / 1e9:12.1f}")
    print("warps: resident warps per SM; SASS/el, MUFU/el: executed instructions (static counts per loop nest x "
          "trip counts) per element of u, S or z; GFLOP tensor: executed by the HGMMAs, padding included")
    from kernels.sweep import print_byte_check
    print_byte_check(report["byte_check"])


def _write_json(path: str, report: dict) -> None:
    """Replace `path` with `report` atomically: a run killed at any point leaves the last complete file."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(partial, path)


def main(argv=None) -> int:
    return run_command(command_line().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Benchmark as the parsed options ask; prints the tables, writes the JSON."""
    interpreted = select_interpreter()  # before triton is imported: interpreted exactly when no GPU is visible
    on_gpu = torch.cuda.is_available() and not interpreted
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        print(f"device: {torch.cuda.get_device_name(device)}; bf16, recipe calls at "
              f"{args.batch or 'each recipe'}'s batch")
    else:
        # One thread: on a small shared CPU, OpenMP threads waiting on each other dominate toy-shape timings.
        torch.set_num_threads(1)
        print("NO GPU: the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1) on the CPU at toy\n"
              "shapes, in float32. These timings measure the interpreter and the CPU, not the kernels; run on a\n"
              "CUDA machine for the recipe shapes.\n")
    from kernels import cost_model  # here: it imports triton, after the interpreter's choice

    ceilings = measure_ceilings(on_gpu, device)
    device_name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({platform.processor() or 'unknown'})"
    # The machines predictions are priced on: this GPU at its measured ceilings, or the stated H100 and H200.
    gpus = cost_model.machines(ceilings=ceilings, name=device_name) if on_gpu else cost_model.machines()
    cases = [c for c in build_cases(on_gpu, args.batch, not args.no_compile, device,
                                    [args.recipe] if args.recipe and on_gpu else None)
             if args.op in ("all", c.op) and (args.tokens is None or c.op != "decoder" or c.shape["tokens"] in args.tokens)]
    report = {"device": device_name, "interpreted": not on_gpu, "torch": torch.__version__, "ceilings": ceilings,
              "complete": False, "results": []}
    results = []
    for case in cases:
        for impl in case.impls:
            if args.impls is not None and impl not in args.impls:
                continue
            results.append(run_case(case, impl, on_gpu, args.reps))
            if on_gpu:
                add_prediction(results[-1], gpus[0])
            print(f"  {case.op} {case.shape} {impl}: "
                  + (results[-1].error or f"{results[-1].ms:.3f} ms"), file=sys.stderr, flush=True)
            if args.json:
                report["results"].append(asdict(results[-1]))
                _write_json(args.json, report)
    print_table(results, ceilings, device_name if on_gpu else None)
    report["target_floors"] = target_floors(gpus[0])
    print_floors(report["target_floors"])
    report["predictions"] = cost_model.report(gpus)
    print()
    cost_model.print_report(report["predictions"])
    if not args.no_static:
        report["static"] = static_report()
        print_static(report["static"])
    if args.json:
        report["complete"] = True
        _write_json(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(_COMMAND_LINE))
