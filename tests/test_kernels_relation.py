"""Fused relation KL vs `dpal.losses.relation_kl_reference` in float64, forward and backward.

Targets are compared as stored (float32, float16, or int8 log-domain codes with row scales): the
reference sees the same stored target, so the error measured is the kernel's alone.
"""
import pytest
import torch

from dpal.losses import quantize_relation, relation_kl_reference, relation_matrix
from kernels.relation_loss import relation_kl

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
TARGET_FORMATS = ["float32", "float16", "int8"]


def _stored_target(probs, fmt):
    """Target as the store keeps it: float16, or int8 log-domain codes with row scales."""
    if fmt != "int8":
        return probs.to(getattr(torch, fmt)), None
    return quantize_relation(probs)


def _check_against_reference(shape, dtype, fmt, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, n, dim = shape
    y64 = torch.randn(batch, n, dim, generator=generator, dtype=torch.float64)
    teacher = torch.randn(batch, n, dim, generator=generator, dtype=torch.float64) * 2
    probs = relation_matrix(teacher)
    probs[0, 0, : n // 2] = 0  # exact zeros: x log x -> 0 must hold in the kernel too
    target, scale = _stored_target(probs, fmt)

    y = y64.to(device, dtype).requires_grad_()
    y_ref = y.detach().cpu().double().requires_grad_()
    loss_ref = relation_kl_reference(y_ref, target, scale)
    loss_ref.backward()
    loss = relation_kl(y, target.to(device), None if scale is None else scale.to(device))
    (loss * 1.0).backward()

    tol = TOLERANCE[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert y.grad.dtype == dtype
    errors = {"loss": ((loss.cpu().double() - loss_ref).abs() / loss_ref.abs()).item(),
              "d_y": ((y.grad.cpu().double() - y_ref.grad).norm() / y_ref.grad.norm()).item()}
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol} for {shape} {dtype} {fmt} target: {bad}"


# (B, N, D): tiny N, N not a block multiple (tail blocks only; full blocks and a tail of 3), N = 64 (Swin).
CPU_SHAPES = [(2, 3, 8), (2, 5, 16), (3, 70, 40), (2, 131, 40), (2, 64, 24)]


@pytest.mark.parametrize("fmt", TARGET_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_small(shape, dtype, fmt):
    _check_against_reference(shape, dtype, fmt, "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.cuda  # recipe shapes
@pytest.mark.parametrize("fmt", TARGET_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 257, 768), (64, 257, 1024), (64, 64, 1024)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_recipe_shapes(shape, dtype, fmt):
    _check_against_reference(shape, dtype, fmt, "cuda")


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
