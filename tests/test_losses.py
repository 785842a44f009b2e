"""DPAL losses (spec section 6) against direct float64 computations on fresh random inputs."""
import math

import pytest
import torch

from dpal.config import OptimConfig
from dpal.losses import (RELATION_LOG_RANGE, global_loss, local_loss, moe_weight, quantize_relation, relation_kl,
                         relation_kl_reference, relation_matrix, relation_probabilities, LossTerms)


def _direct_relation(tokens):
    b, n, d = tokens.shape
    out = torch.empty(b, n, n, dtype=torch.float64)
    for i in range(b):
        for r in range(n):
            logits = [float(tokens[i, r].double() @ tokens[i, c].double()) / math.sqrt(d) for c in range(n)]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            out[i, r] = torch.tensor(exps, dtype=torch.float64) / sum(exps)
    return out


def _direct_kl(target_probs, student_probs):
    b, n, _ = target_probs.shape
    total = 0.0
    for i in range(b):
        for r in range(n):
            total += sum(float(p) * (math.log(float(p)) - math.log(float(q)))
                         for p, q in zip(target_probs[i, r], student_probs[i, r]) if p > 0)
    return total / (b * n)


@pytest.mark.parametrize("b,n,d", [(2, 5, 7), (1, 17, 16), (3, 1, 4)])
def test_relation_matrix_matches_direct_softmax(b, n, d):
    tokens = torch.randn(b, n, d, dtype=torch.float64)
    got = relation_matrix(tokens)
    torch.testing.assert_close(got, _direct_relation(tokens), rtol=1e-12, atol=1e-14)
    assert relation_matrix(tokens.float()).dtype == torch.float32
    assert relation_matrix(tokens.bfloat16()).dtype == torch.float32  # softmax never in bf16


@pytest.mark.parametrize("b,n,d", [(2, 257, 64), (3, 31, 48)])
def test_relation_logits_stay_float32_under_bf16_autocast(b, n, d):
    """Spec 6: autocast must not round Y Y^T to bf16 (a logit near 28 would move in steps of 0.125)."""
    g = torch.Generator().manual_seed(1000 * n + d)
    # rows of norm^2 ~ 28 sqrt(d): diagonal logits near 28, as a trained decoder output gives
    y = torch.randn(b, n, d, generator=g) * math.sqrt(28 / math.sqrt(d))
    target = relation_matrix(torch.randn(b, n, d, generator=g))
    y32 = y.clone().requires_grad_(True)
    expected = relation_kl_reference(y32, target)
    expected.backward()
    y_autocast = y.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probabilities = relation_matrix(y)
        got = relation_kl_reference(y_autocast, target)
    got.backward()  # outside autocast, as the training loop does
    assert torch.equal(got, expected) and torch.equal(y_autocast.grad, y32.grad)
    assert torch.equal(probabilities, relation_matrix(y)) and probabilities.dtype == torch.float32


@pytest.mark.parametrize("b,n,d", [(2, 6, 8), (1, 13, 5)])
def test_relation_kl_matches_direct_float_target(b, n, d):
    y = torch.randn(b, n, d, dtype=torch.float64)
    target = relation_matrix(torch.randn(b, n, 3, dtype=torch.float64) * 2)
    target[0, 0] = 0.0  # a row with exact zeros must contribute 0 * log 0 = 0, not nan
    target[0, 0, 1] = 1.0
    got = relation_kl_reference(y, target)
    expected = _direct_kl(target, _direct_relation(y))
    assert math.isclose(float(got), expected, rel_tol=1e-10)
    # the dispatched op is the same function here (no CUDA)
    assert math.isclose(float(relation_kl(y, target)), expected, rel_tol=1e-10)


def test_relation_kl_int8_target_is_softmax_of_codes_times_row_scale():
    b, n, d = 2, 9, 6
    y = torch.randn(b, n, d, dtype=torch.float64)
    q, scale = quantize_relation(relation_matrix(torch.randn(b, n, 4, dtype=torch.float64)))
    scale = scale.double()  # a float64 scale decodes in float64
    logits = q.double() * scale[..., None]
    decoded = logits.exp() / logits.exp().sum(-1, keepdim=True)
    got = relation_kl_reference(y, q, scale)
    expected = _direct_kl(decoded, _direct_relation(y))
    assert math.isclose(float(got), expected, rel_tol=1e-10)
    with pytest.raises(ValueError, match="row scale"):
        relation_kl_reference(y, q)
    with pytest.raises(ValueError, match="shape"):
        relation_kl_reference(y, q, scale[:, :-1])


def test_quantize_relation_keeps_small_probabilities():
    """Log-domain int8 codes: relative error per entry within half a step, KL ~1e-4, where a linear
    code (q * row max / 127) would zero most of a 257-token row."""
    tokens = torch.randn(4, 257, 64, dtype=torch.float64) * 1.5
    probs = relation_matrix(tokens)
    q, scale = quantize_relation(probs)
    assert q.dtype == torch.int8 and scale.shape == (4, 257) and int(q.max()) == 127 and int(q.min()) >= -128
    decoded = relation_probabilities(q, scale).double()
    kl = _direct_kl(probs, decoded)
    assert 0 < kl < 1e-3
    kept = probs.log() >= probs.log().amax(-1, keepdim=True) - RELATION_LOG_RANGE
    log_ratio = decoded.log() - probs.log()
    # each kept entry is off by at most half a step, besides its row's common normalisation shift
    spread = log_ratio.where(kept, -math.inf).amax(-1) - log_ratio.where(kept, math.inf).amin(-1)
    assert bool((spread <= scale.double() * 1.001 + 1e-9).all())
    linear_zeroed = (torch.round(probs / (probs.amax(-1, keepdim=True) / 127)) == 0).double().mean()
    assert float(linear_zeroed) > 0.5 and bool((decoded > 0).all())
    uniform_q, uniform_scale = quantize_relation(torch.full((2, 5), 0.2))
    assert torch.equal(uniform_scale, torch.zeros(2))
    assert torch.allclose(relation_probabilities(uniform_q, uniform_scale), torch.full((2, 5), 0.2))
    floored_q, _ = quantize_relation(torch.tensor([[1.0, 0.0, 1e-30]]))  # below the floor: code -128
    assert floored_q.tolist() == [[127, -128, -128]]


def test_relation_kl_float16_target_and_gradient():
    y = torch.randn(2, 7, 5, requires_grad=True)
    target = relation_matrix(torch.randn(2, 7, 5)).half()
    loss = relation_kl_reference(y, target)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    expected = _direct_kl(target.double(), _direct_relation(y.detach()))
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5)
    # KL of a distribution with itself is zero
    same = relation_kl_reference(y.detach().double(), relation_matrix(y.detach().double()))
    assert abs(float(same)) < 1e-12


def test_relation_kl_rejects_mismatched_target():
    with pytest.raises(ValueError, match="expected"):
        relation_kl_reference(torch.randn(2, 5, 3), torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="not supported"):
        relation_kl_reference(torch.randn(2, 5, 3), torch.ones(2, 5, 5, dtype=torch.int32))


def test_global_loss_is_mean_of_per_view_mse():
    b, d = 4, 6
    target = torch.randn(b, d, dtype=torch.float64)
    views = [torch.randn(b, 1, d, dtype=torch.float64) for _ in range(3)]
    expected = sum(float(((v[:, 0] - target) ** 2).sum()) / (b * d) for v in views) / 3
    assert math.isclose(float(global_loss(views, target)), expected, rel_tol=1e-12)
    with pytest.raises(ValueError):
        global_loss([], target)


def test_local_loss_is_masked_mse():
    b, n, d = 3, 7, 5
    s, t = torch.randn(b, n, d, dtype=torch.float64), torch.randn(b, n, d, dtype=torch.float64)
    mask = torch.rand(b, n, dtype=torch.float64)
    direct = sum(float((mask[i, j] * s[i, j, k] - mask[i, j] * t[i, j, k]) ** 2)
                 for i in range(b) for j in range(n) for k in range(d)) / (b * n * d)
    assert math.isclose(float(local_loss(s, t, mask)), direct, rel_tol=1e-12)
    # a float16 mask / target (as stored) is accepted
    got16 = local_loss(s.float(), t.half(), mask.half())
    assert math.isclose(float(got16), direct, rel_tol=2e-3)
    with pytest.raises(ValueError, match="mask"):
        local_loss(s, t, mask[:, :-1])


def test_moe_weight_schedule_and_total():
    optim = OptimConfig()
    assert [moe_weight(e, optim) for e in (0, 19, 19.99, 20, 199)] == [0.1, 0.1, 0.1, 0.01, 0.01]
    terms = LossTerms.summed(*map(torch.tensor, (1.0, 2.0, 3.0, 4.0, 5.0)), moe_loss_weight=0.1)
    assert math.isclose(float(terms.total), 1 + 2 + 3 + 0.4 + 5, rel_tol=1e-6)
    assert terms.names() == ("total", "global", "local", "relation", "moe", "experts")
    assert [float(v) for v in terms.by_name().values()] == [float(terms.total), 1.0, 2.0, 3.0, 4.0, 5.0]
