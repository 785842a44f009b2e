"""Fused relation KL vs `dpal.losses.relation_kl_reference` in float64, forward and backward.

Targets are compared as stored (float32, float16, or int8 log-domain codes with row scales): the
reference sees the same stored target, so the error measured is the kernel's alone. Inputs are realistic
(`kernels.bench.relation_inputs`: a KL of 0.01 to 1 per row); one near-one-hot case shows that rows whose
KL float32 cannot resolve are still handled to within float32's resolution.
"""
import math

import pytest
import torch

from dpal.losses import quantize_relation, relation_kl_reference
from kernels import shapes
from kernels.bench import near_one_hot_relation_inputs, relation_inputs
from kernels.relation_loss import relation_kl

EPS32 = torch.finfo(torch.float32).eps
# KL_i = cross_i + P_i lse_i: two float32 terms of the size of the row's log-sum-exp cancel to a KL that may be
# far smaller, so the loss is resolved to a few float32 epsilons times the mean lse (absolute) at best; on top
# of that, relative errors: float32 sums over N and D (and, compiled, the 2-ulp ex2.approx / lg2.approx) for
# the loss and float32 gradients; bf16 gradients carry bf16 output rounding (2^-9) and the bf16 dY GEMM.
LOSS_ULPS_OF_LSE = 4
LOSS_TOLERANCE = 5e-5
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
TARGET_FORMATS = ["float32", "float16", "int8"]


def _stored_target(probs, fmt):
    """Target as the store keeps it: float16, or int8 log-domain codes with row scales."""
    if fmt != "int8":
        return probs.to(getattr(torch, fmt)), None
    return quantize_relation(probs)


def _run_both(y64, probs, dtype, fmt, device):
    """(kernel loss, reference loss, kernel dY, reference dY, reference mean lse) on the same rounded inputs."""
    target, scale = _stored_target(probs, fmt)
    y = y64.to(device, dtype).requires_grad_()
    y_ref = y.detach().cpu().double().requires_grad_()
    loss_ref = relation_kl_reference(y_ref, target, scale)
    loss_ref.backward()
    loss = relation_kl(y, target.to(device), None if scale is None else scale.to(device))
    (loss * 1.0).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert y.grad.dtype == dtype
    mean_lse = torch.logsumexp(y_ref.detach() @ y_ref.detach().transpose(1, 2) / math.sqrt(y64.shape[-1]), -1).mean()
    return loss.cpu().double(), loss_ref.detach(), y.grad.cpu().double(), y_ref.grad, mean_lse.item()


def _check_against_reference(shape, dtype, fmt, device, seed=0):
    y64, probs = relation_inputs(*shape, torch.Generator().manual_seed(seed))
    probs[0, 0, : shape[1] // 2] = 0  # exact zeros: x log x -> 0 must hold in the kernel too
    probs[0, 0] /= probs[0, 0].sum()
    loss, loss_ref, grad, grad_ref, mean_lse = _run_both(y64, probs, dtype, fmt, device)
    loss_error = (loss - loss_ref).abs().item()
    loss_bound = LOSS_TOLERANCE * loss_ref.abs().item() + LOSS_ULPS_OF_LSE * EPS32 * mean_lse
    grad_error = ((grad - grad_ref).norm() / grad_ref.norm()).item()
    assert loss_error <= loss_bound and grad_error <= GRAD_TOLERANCE[dtype], (
        f"{shape} {dtype} {fmt} target: loss error {loss_error:.3g} (bound {loss_bound:.3g}, loss "
        f"{loss_ref.item():.4g}), dY relative error {grad_error:.3g} (bound {GRAD_TOLERANCE[dtype]})")


# On the CPU the kernels run in the interpreter at the small shapes (the end-to-end tier); with CUDA they run
# compiled (and `--cuda-cases` selects them).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.e2e
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("fmt", TARGET_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", shapes.RELATION_TEST_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_small(shape, dtype, fmt, device):
    _check_against_reference(shape, dtype, fmt, device)


@pytest.mark.cuda  # recipe shapes
@pytest.mark.parametrize("fmt", TARGET_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", sorted(shapes.relation_calls(shapes.CUDA_TEST_BATCH)),
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_recipe_shapes(shape, dtype, fmt):
    _check_against_reference(shape, dtype, fmt, "cuda")


@pytest.mark.e2e
@pytest.mark.parametrize("device", [DEVICE])
def test_near_one_hot_rows_are_resolved_to_float32(device):
    # Each row nearly one-hot on its diagonal (logit ~ sqrt(768) ~ 28): the true KL (~1e-9 per row) is below
    # what float32 resolves next to an lse of ~28, so the loss is checked absolutely, to a few epsilons of
    # the lse; dKL/dS = softmax - p is a difference of two near-one-hot rows whose softmax entries come from
    # exponents S - lse resolved to a few epsilons of the lse, so dY's error is bounded by that times
    # sum_j |Y_j| / (B N sqrt D), twice (G + G^T).
    batch, n, dim = 2, 64, 768
    y64, probs = near_one_hot_relation_inputs(batch, n, dim, torch.Generator().manual_seed(0))
    loss, loss_ref, grad, grad_ref, mean_lse = _run_both(y64, probs, torch.float32, "float32", device)
    assert loss_ref.item() < 1e-6  # the degenerate case it stands for
    assert (loss - loss_ref).abs().item() <= LOSS_ULPS_OF_LSE * EPS32 * mean_lse
    grad_bound = 2 * LOSS_ULPS_OF_LSE * EPS32 * mean_lse * y64.abs().sum(1).max().item() / (batch * n * math.sqrt(dim))
    assert (grad - grad_ref).abs().max().item() <= grad_bound
    assert torch.isfinite(grad).all()


def test_bad_inputs_are_named():
    y = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match=r"y has dtype torch.float64; supported: float32, bfloat16, float16"):
        relation_kl(y.double(), torch.rand(2, 5, 5))
    with pytest.raises(TypeError, match=r"target has dtype torch.int32; supported: .*int8"):
        relation_kl(y, torch.zeros(2, 5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"target has shape \(2, 5, 4\), expected \(2, 5, 5\)"):
        relation_kl(y, torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match=r"int8 targets need target_row_scale"):
        relation_kl(y, torch.zeros(2, 5, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"target_row_scale has shape \(2, 4\), expected \(2, 5\)"):
        relation_kl(y, torch.zeros(2, 5, 5, dtype=torch.int8), torch.ones(2, 4))
