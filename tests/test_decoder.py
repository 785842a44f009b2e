"""Dynamic pattern decoder (spec section 5) against direct float64 computations on fresh random inputs."""
import math
import os
import subprocess
import sys

import pytest
import torch

from dpal import dispatch
from dpal.config import DecoderSpec
from dpal.decoder import LAYER_NORM_EPS, DynamicPatternDecoder, expert_path, expert_path_reference
from dpal.recipes import RECIPES


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _direct_expert_path(queries, scores, h, w, b, ln_e_w, ln_e_b, ln_o_w, ln_o_b, divisor, loss_weight, eps):
    batch, patterns, dim = queries.shape
    out_dim = ln_o_w.shape[0]
    ys, losses = [], []
    for i in range(batch):
        mixed = torch.zeros(dim, out_dim, dtype=torch.float64)
        for e in range(patterns):
            expert = _layer_norm(_gelu(w @ queries[i, e] + b), ln_e_w, ln_e_b, eps)
            mixed += scores[i, e] * expert.reshape(dim, out_dim)
        mixed /= divisor
        losses.append(loss_weight * (mixed ** 2).sum())
        ys.append(_layer_norm(_gelu(h[i] @ mixed), ln_o_w, ln_o_b, eps))
    return torch.stack(ys), torch.stack(losses).mean()


@pytest.mark.parametrize("batch,length,dim,out_dim", [(2, 5, 4, 3), (3, 1, 6, 5), (1, 9, 8, 8)])
def test_expert_path_reference_matches_direct(batch, length, dim, out_dim):
    f64 = dict(dtype=torch.float64)
    queries, h = torch.randn(batch, 3, dim, **f64), torch.randn(batch, length, dim, **f64)
    scores = torch.randn(batch, 3, **f64).softmax(-1)
    params = [torch.randn(dim * out_dim, dim, **f64), torch.randn(dim * out_dim, **f64),
              1 + 0.1 * torch.randn(dim * out_dim, **f64), 0.1 * torch.randn(dim * out_dim, **f64),
              1 + 0.1 * torch.randn(out_dim, **f64), 0.1 * torch.randn(out_dim, **f64)]
    for divisor, loss_weight, eps in ((256.0, 0.025, 1e-5), (2.0, 1.0, 1e-6)):
        y, loss = expert_path_reference(queries, scores, h, *params, mix_divisor=divisor,
                                        experts_loss_weight=loss_weight, eps=eps)
        y_direct, loss_direct = _direct_expert_path(queries, scores, h, *params, divisor, loss_weight, eps)
        torch.testing.assert_close(y, y_direct, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(loss, loss_direct, rtol=1e-10, atol=0)
        y_dispatch, loss_dispatch = expert_path(queries, scores, h, *params, mix_divisor=divisor,
                                                experts_loss_weight=loss_weight, eps=eps)
        torch.testing.assert_close(y_dispatch, y_direct, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(loss_dispatch, loss_direct, rtol=1e-10, atol=0)


def _direct_attention(query, key, value, mha):
    """Multi-head attention written out from the module's packed in-projection and out-projection."""
    heads, dim = mha.num_heads, mha.embed_dim
    w_q, w_k, w_v = mha.in_proj_weight.split(dim)
    b_q, b_k, b_v = mha.in_proj_bias.split(dim)

    def split(x):  # [n, dim] -> [heads, n, dim/heads]
        return x.reshape(x.shape[0], heads, dim // heads).transpose(0, 1)

    q, k, v = split(query @ w_q.T + b_q), split(key @ w_k.T + b_k), split(value @ w_v.T + b_v)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim // heads), dim=-1)
    out = (weights @ v).transpose(0, 1).reshape(query.shape[0], dim)
    return out @ mha.out_proj.weight.T + mha.out_proj.bias


def _direct_decoder(dec, x, pattern):
    """Spec section 5 step by step for one sample at a time, from the decoder's parameters."""
    eps, spec = LAYER_NORM_EPS, dec.spec
    ys, auxes, losses = [], [], []
    for sample in x:
        if dec.down_proj is not None:
            sample = _layer_norm(_gelu(sample @ dec.down_proj.weight.T + dec.down_proj.bias),
                                 dec.down_norm.weight, dec.down_norm.bias, eps)
        x_in = sample
        h = _layer_norm(sample + _direct_attention(sample, sample, sample, dec.token_attn),
                        dec.token_norm.weight, dec.token_norm.bias, eps)
        g0 = _layer_norm(dec.gate_token, dec.gate_norm.weight, dec.gate_norm.bias, eps)[None]
        g = _direct_attention(g0, h, h, dec.gate_attn)[0]
        logits = dec.gate_weight @ g
        scores = torch.exp(logits) / torch.exp(logits).sum()
        auxes.append(-torch.log(scores[pattern]))
        q = dec.pattern_queries + _direct_attention(dec.pattern_queries, dec.pattern_queries,
                                                    dec.pattern_queries, dec.query_self_attn)
        q_norm = _layer_norm(q, dec.query_cross_norm.weight, dec.query_cross_norm.bias, eps)
        q = q + _direct_attention(q_norm, x_in, x_in, dec.query_cross_attn)
        q = _layer_norm(q, dec.expert_query_norm.weight, dec.expert_query_norm.bias, eps)
        y, loss = _direct_expert_path(
            q[None], scores[None], h[None], dec.expert_proj.weight, dec.expert_proj.bias,
            dec.expert_norm.weight, dec.expert_norm.bias, dec.out_norm.weight, dec.out_norm.bias,
            spec.mix_divisor, spec.experts_loss_weight, eps)
        ys.append(y[0])
        losses.append(loss)
    return torch.stack(ys), torch.stack(auxes).mean(), torch.stack(losses).mean()


def _small_spec(inter: bool) -> DecoderSpec:
    # width 48: divisible by align_heads 16 and gate_heads 12, as every recipe's width is
    return DecoderSpec(in_dim=48, out_dim=20, student_dim=40 if inter else 48)


def _randomize(dec):
    """Fresh random values everywhere (zero-initialised queries/biases would hide mistakes)."""
    with torch.no_grad():
        for name, p in dec.named_parameters():
            is_norm_scale = name.endswith("norm.weight")
            p.copy_((1.0 if is_norm_scale else 0.0) + torch.randn_like(p) * (0.2 if is_norm_scale else 0.5))
    return dec


@pytest.mark.parametrize("inter", [False, True])
@pytest.mark.parametrize("length", [1, 7])
def test_decoder_matches_direct_spec_computation(inter, length):
    torch.manual_seed(length + 10 * inter)
    dec = _randomize(DynamicPatternDecoder(_small_spec(inter)).double())
    x = torch.randn(3, length, dec.spec.student_dim, dtype=torch.float64)
    for pattern in range(3):
        out = dec(x, pattern)
        y, aux, loss = _direct_decoder(dec, x, pattern)
        assert out.y.shape == (3, length, dec.spec.out_dim)
        torch.testing.assert_close(out.y, y, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.aux_loss, aux, rtol=1e-9, atol=0)
        torch.testing.assert_close(out.experts_loss, loss, rtol=1e-9, atol=0)


@pytest.mark.parametrize("value, forced", [("1", True), ("0", False)])
def test_force_reference_from_environment(value, forced):
    # Read once at import: a fresh process (reloading the module here would replace the class of every op).
    probe = "from dpal import dispatch; print(dispatch.reference_forced())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, DPAL_FORCE_REFERENCE=value))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(forced)]


def test_force_reference_switch_keeps_numerics():
    dec = DynamicPatternDecoder(_small_spec(False))
    x = torch.randn(2, 4, 48)
    before = dispatch.reference_forced()
    try:
        dispatch.force_reference(True)
        assert dispatch.reference_forced()
        forced = dec(x, 1)
        dispatch.force_reference(False)
        assert not dispatch.reference_forced()
        chosen = dec(x, 1)
    finally:
        dispatch.force_reference(before)
    torch.testing.assert_close(forced.y, chosen.y)


@pytest.mark.parametrize("inter", [False, True])
def test_gradients_reach_every_parameter(inter):
    torch.manual_seed(3)
    dec = DynamicPatternDecoder(_small_spec(inter))
    # The queries start at zero, which gives their self-attention's in-projection weight an exactly
    # zero gradient on the first step only (its input is zero); move them off zero as training does.
    with torch.no_grad():
        dec.pattern_queries.normal_()
    expected = {"gate_token", "gate_weight", "pattern_queries", "token_attn", "token_norm", "gate_norm",
                "gate_attn", "query_self_attn", "query_cross_norm", "query_cross_attn", "expert_query_norm",
                "expert_proj", "expert_norm", "out_norm"} | ({"down_proj", "down_norm"} if inter else set())
    assert {n.split(".")[0] for n, _ in dec.named_parameters()} == expected  # no unused modules
    x = torch.randn(2, 5, dec.spec.student_dim, requires_grad=True)
    total = sum(out.y.pow(2).mean() + out.aux_loss + out.experts_loss for out in (dec(x, p) for p in range(3)))
    total.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    assert x.grad.abs().sum() > 0


def test_aux_loss_gradient_reaches_only_the_gate_path():
    dec = DynamicPatternDecoder(_small_spec(False))
    dec(torch.randn(2, 5, 48), 2).aux_loss.backward()
    for name, p in dec.named_parameters():
        on_gate_path = name.split(".")[0] in {"gate_token", "gate_norm", "gate_attn", "gate_weight",
                                             "token_attn", "token_norm"}
        assert (p.grad is not None and p.grad.abs().sum() > 0) == on_gate_path, name


def test_init_follows_the_original():
    dec = DynamicPatternDecoder(_small_spec(True))
    assert torch.count_nonzero(dec.pattern_queries) == 0
    assert torch.count_nonzero(dec.expert_proj.bias) == 0 and torch.count_nonzero(dec.token_attn.in_proj_bias) == 0
    bound = math.sqrt(6 / (48 + 48 * 20))  # xavier-uniform of the D -> D*D_o layer
    assert dec.expert_proj.weight.abs().max() <= bound
    assert torch.equal(dec.out_norm.weight, torch.ones(20))


def test_bad_input_is_named():
    dec = DynamicPatternDecoder(_small_spec(False))
    with pytest.raises(ValueError, match="pattern"):
        dec(torch.randn(1, 2, 48), 3)
    with pytest.raises(ValueError, match=r"\[B, L, 48\]"):
        dec(torch.randn(1, 2, 40), 0)
    with pytest.raises(ValueError, match="divisible"):
        DynamicPatternDecoder(DecoderSpec(in_dim=40, out_dim=8, student_dim=40))


@pytest.mark.parametrize("name", list(RECIPES))
def test_output_shapes_for_every_recipe(name):
    spec = RECIPES[name].decoder
    # Built on the meta device: the Swin decoders' D -> D*D_o layer alone has ~600M parameters.
    with torch.device("meta"):
        dec = DynamicPatternDecoder(spec)
        for length, pattern in ((1, 0), (128, 1), (257, 2)):
            out = dec(torch.randn(2, length, spec.student_dim), pattern)
            assert out.y.shape == (2, length, spec.out_dim)
            assert out.aux_loss.shape == () and out.experts_loss.shape == ()
    assert dec.expert_proj.weight.shape == (spec.in_dim * spec.out_dim, spec.in_dim)
    assert (dec.down_proj is not None) == (spec.in_dim != spec.student_dim)


@pytest.mark.parametrize("name", ["path-b_vit-ti", "path-l_vit-b"])
def test_real_forward_backward_for_small_recipes(name):
    spec = RECIPES[name].decoder
    dec = DynamicPatternDecoder(spec)
    x = torch.randn(2, 9, spec.student_dim)
    out = dec(x, 1)
    (out.y.mean() + out.aux_loss + out.experts_loss).backward()
    assert out.y.shape == (2, 9, spec.out_dim) and torch.isfinite(out.y).all()
    assert dec.expert_proj.weight.grad is not None
