"""Fused decoder expert path vs `dpal.decoder.expert_path_reference` in float64, forward and backward.

On CPU the Triton kernels run in the interpreter at small shapes (ragged tiles, L = 1, several row and
column blocks, chunked backward); with CUDA they run compiled, and the recipes' shapes are added.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from dpal import decoder, dispatch, losses
from dpal.decoder import DynamicPatternDecoder, expert_path_reference
from dpal.recipes import RECIPES
from kernels import decoder_experts, relation_loss, shapes
from kernels._common import multiprocessors
from kernels.decoder_experts import expert_path

# Relative-error ceilings: fp32 kernels accumulate in fp32 (IEEE dots); bf16 outputs and the stored W_b
# carry bf16 rounding (2^-9) and the bf16 GEMMs in backward round their outputs too.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
NAMES = ("queries", "scores", "h", "expert_weight", "expert_bias", "expert_norm_weight", "expert_norm_bias",
         "out_norm_weight", "out_norm_bias")
GEMM_OPERANDS = {"queries", "h", "expert_weight"}
EPS = 1e-6  # the decoder's LayerNorm eps


def _inputs(batch, patterns, dim, out_dim, tokens, generator):
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    features = dim * out_dim
    return {"queries": randn(batch, patterns, dim), "scores": randn(batch, patterns).softmax(-1),
            "h": randn(batch, tokens, dim), "expert_weight": randn(features, dim, scale=dim ** -0.5),
            "expert_bias": randn(features, scale=0.1), "expert_norm_weight": 1 + 0.2 * randn(features),
            "expert_norm_bias": 0.2 * randn(features), "out_norm_weight": 1 + 0.2 * randn(out_dim),
            "out_norm_bias": 0.2 * randn(out_dim)}


def _relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _check_against_reference(shape, dtype, device, seed=0, weight_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    base = _inputs(*shape, generator)
    # Kernel inputs: GEMM operands in the test dtype, the small vectors in fp32 (as under autocast).
    dtypes = {n: dtype if n in GEMM_OPERANDS else torch.float32 for n in base}
    dtypes["expert_weight"] = weight_dtype or dtype
    ours = {n: t.to(device, dtypes[n]).requires_grad_() for n, t in base.items()}
    # The reference sees exactly the rounded values the kernel sees, in float64.
    ref = {n: t.detach().double().cpu().requires_grad_() for n, t in ours.items()}
    grad_y = torch.randn(shape[0], shape[4], shape[3], generator=generator, dtype=torch.float64)
    grad_loss = 3.0

    y_ref, loss_ref = expert_path_reference(*ref.values(), eps=EPS)
    ((y_ref * grad_y).sum() + grad_loss * loss_ref).backward()
    y, loss = expert_path(*ours.values(), eps=EPS)
    ((y.double() * grad_y.to(device)).sum() + grad_loss * loss.double()).backward()

    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == y_ref.shape
    errors = {"y": _relative_error(y.cpu(), y_ref.detach()), "loss": _relative_error(loss.cpu(), loss_ref.detach())}
    errors.update({f"d_{n}": _relative_error(ours[n].grad.cpu(), ref[n].grad) for n in NAMES})
    assert all(ours[n].grad.dtype == ours[n].dtype for n in NAMES)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol} for {shape} {dtype}: {bad}"


# (B, P, D, D_o, L), kernels.shapes.DECODER_TEST_SHAPES: the first four for both dtypes, the last two for the
# float32-weight and the sliced-dq cases. On the CPU the kernels run in the interpreter at these small shapes
# (half a minute in all: the end-to-end tier); with CUDA they run compiled (and `--cuda-cases` selects them).
CPU_SHAPES = shapes.DECODER_TEST_SHAPES[:4]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.e2e
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_small(shape, dtype, device):
    _check_against_reference(shape, dtype, device)


@pytest.mark.e2e
@pytest.mark.parametrize("device", [DEVICE])
def test_float32_expert_weight_with_bf16_activations(device):
    # The autocast layout: the fp32 parameter goes in as is (rounded to bf16 once inside the op) and its
    # gradient comes out float32, written by the weight-gradient pass.
    _check_against_reference(shapes.DECODER_TEST_SHAPES[4], torch.bfloat16, device, weight_dtype=torch.float32)


@pytest.mark.e2e
@pytest.mark.parametrize("device", [DEVICE])
def test_sliced_query_gradient_matches_reference(device):
    # dq is summed over slices of the columns; at this shape the plan cuts them into several, the last one
    # ending in a ragged column tile.
    batch, patterns, dim, out_dim, _ = shape = shapes.DECODER_TEST_SHAPES[5]
    query_grad = decoder_experts.expert_plan(batch, patterns, dim, out_dim, torch.float32, torch.float32, 256.0,
                                             0.025, EPS, multiprocessors(torch.device(device)))["backward"][-1]
    slices, span = query_grad.grid[1], query_grad.scalars["span"]
    assert slices > 1 and (dim * out_dim - (slices - 1) * span) % query_grad.config["BLOCK_M"] != 0
    _check_against_reference(shape, torch.float32, device)


@pytest.mark.e2e
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_passes_that_load_their_queries_at_each_k_step_match_reference(dtype, device, monkeypatch):
    # At D = 384 the GEMM passes load their queries at each step of a K loop instead of holding them: their
    # configs pinned there, run at a test shape with ragged column tiles.
    batch, patterns, dim, out_dim, _ = shape = shapes.DECODER_TEST_SHAPES[2]
    kind = "fp32" if dtype == torch.float32 else "bf16"
    for kernel in ("stats", "mix", "grad_stats"):
        loaded = decoder_experts.PINNED_CONFIGS[(kernel, 384, 384 * 768, kind)]
        assert loaded["HOLD_QUERIES"] == 0
        monkeypatch.setitem(decoder_experts.PINNED_CONFIGS, (kernel, dim, dim * out_dim, kind), loaded)
    decoder_experts.expert_plan.cache_clear()
    try:
        forward = decoder_experts.expert_plan(batch, patterns, dim, out_dim, dtype, torch.float32, 256.0, 0.025, EPS,
                                              multiprocessors(torch.device(device)))["forward"]
        assert forward[0].config["HOLD_QUERIES"] == 0 and (dim * out_dim) % forward[0].config["BLOCK_M"]
        _check_against_reference(shape, dtype, device)
    finally:
        decoder_experts.expert_plan.cache_clear()


def _recipe_shapes():
    """Every decoder call the recipes make, at the tests' batch."""
    return sorted(shapes.decoder_calls(shapes.CUDA_TEST_BATCH))


@pytest.mark.cuda  # recipe shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", _recipe_shapes(), ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_recipe_shapes(shape, dtype):
    _check_against_reference(shape, dtype, "cuda")


@pytest.mark.cuda  # dispatch picks the fused op on CUDA only
def test_decoder_dispatches_to_fused_op_on_cuda(monkeypatch):
    recipe = RECIPES["path-b_vit-ti"]
    torch.manual_seed(0)
    decoder = DynamicPatternDecoder(recipe.decoder).cuda()
    with torch.no_grad():
        decoder.pattern_queries.normal_()  # zero init would give identical experts
    x = torch.randn(4, 9, recipe.decoder.student_dim, device="cuda")
    kernels.register()
    results = {}
    for forced in (False, True):
        monkeypatch.setattr(dispatch, "_force_reference", forced)
        decoder.zero_grad()
        out = decoder(x, pattern=2)
        (out.y.float().square().mean() + out.experts_loss).backward()
        results[forced] = (out, {n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None})
    (fused, fused_grads), (ref, ref_grads) = results[False], results[True]
    assert fused.y.grad_fn.name() == "GeneratedBackwardFor_dpal_fused_output_projection_defaultBackward"
    # Both sides are fp32 here; the reference's own rounding (LayerNorm sums over D*D_o values, small
    # gradients of the expert parameters) dominates the difference, hence a looser bound than vs float64.
    assert _relative_error(fused.y, ref.y.double()) < 1e-4
    assert fused_grads.keys() == ref_grads.keys()
    bad = {n: e for n in ref_grads if (e := _relative_error(fused_grads[n], ref_grads[n].double())) > 1e-3}
    assert not bad, bad


def _valid_inputs(**overrides):
    inputs = {n: t.float() for n, t in _inputs(2, 3, 8, 4, 3, torch.Generator().manual_seed(1)).items()}
    inputs.update(overrides)
    return inputs


def test_unsupported_dtype_is_named():
    with pytest.raises(TypeError, match=r"queries has dtype torch.float64; supported: float32, bfloat16"):
        expert_path(*_valid_inputs(queries=torch.zeros(2, 3, 8, dtype=torch.float64)).values())


def test_mixed_gemm_dtypes_are_named():
    with pytest.raises(TypeError, match=r"expert_weight must have it too or be float32.*expert_weight=float16"):
        expert_path(*_valid_inputs(expert_weight=torch.zeros(32, 8, dtype=torch.float16)).values())
    with pytest.raises(TypeError, match=r"queries and h must share one dtype.*h=bfloat16"):
        expert_path(*_valid_inputs(h=torch.zeros(2, 3, 8, dtype=torch.bfloat16)).values())


def test_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"expert_weight has shape \(32, 7\), expected \(32, 8\)"):
        expert_path(*_valid_inputs(expert_weight=torch.zeros(32, 7)).values())
    with pytest.raises(ValueError, match=r"scores has shape \(2, 2\), expected \(2, 3\)"):
        expert_path(*_valid_inputs(scores=torch.zeros(2, 2)).values())


def test_register_plugs_the_fused_ops_into_the_method(monkeypatch):
    for op in (decoder.expert_path, losses.relation_kl):
        monkeypatch.setattr(op, "implementations", {})
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decoder.expert_path.implementation(cuda) is expert_path_reference  # nothing registered: the reference
    kernels.register()
    assert decoder.expert_path.implementation(cuda) is decoder_experts.expert_path
    assert losses.relation_kl.implementation(cuda) is relation_loss.relation_kl
    assert decoder.expert_path.implementation(cpu) is expert_path_reference
    monkeypatch.setattr(dispatch, "_force_reference", True)
    assert decoder.expert_path.implementation(cuda) is expert_path_reference


def test_interpreter_choice_is_explicit_and_refused_on_the_wrong_tensors():
    # In this session triton is imported: the other choice is refused rather than silently not applied.
    with pytest.raises(RuntimeError, match=r"triton is already imported with TRITON_INTERPRET="):
        kernels.select_interpreter(not kernels.interpreter_selected())
    # Compiled kernels given CPU tensors refuse in one line (no GPU needed to see it).
    script = textwrap.dedent("""
        import kernels
        kernels.select_interpreter(False)
        import torch
        from kernels.decoder_experts import expert_path
        sizes = {"queries": (2, 3, 8), "scores": (2, 3), "h": (2, 4, 8), "expert_weight": (32, 8),
                 "expert_bias": (32,), "expert_norm_weight": (32,), "expert_norm_bias": (32,),
                 "out_norm_weight": (4,), "out_norm_bias": (4,)}
        try:
            expert_path(*(torch.zeros(size) for size in sizes.values()))
        except ValueError as error:
            print(error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ("fused expert path: tensors are on cpu, but the fused op is compiled, so it runs on CUDA "
                           "tensors (CPU tensors need TRITON_INTERPRET=1); choose with kernels.select_interpreter() "
                           "before triton is imported, or run the dpal reference\n")
