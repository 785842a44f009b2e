"""distill_step_losses: real students and decoders, every decoder call of spec section 5, every loss."""
import dataclasses

import pytest
import torch

from dpal.decoder import DynamicPatternDecoder
from dpal.distill import distill_step_losses
from dpal.losses import global_loss, local_loss, relation_kl_reference, relation_matrix
from dpal.recipes import get_recipe
from dpal.students import build_student

BATCH = 2


def _small_decoder_recipe(name):
    """The recipe with a narrow decoder (inter_dim 48) so that Swin students (768 wide, whose recipe
    decoder has a ~600M-parameter expert layer) run in a test; the wiring under test is unchanged."""
    recipe = get_recipe(name)
    if recipe.decoder.in_dim <= 192:
        return recipe
    return dataclasses.replace(recipe, decoder=dataclasses.replace(recipe.decoder, in_dim=48))


def _inputs(recipe, generator, num_local=2, dtype=torch.float32):
    teacher = recipe.teacher
    grid = (256 // teacher.token_stride, 128 // teacher.token_stride)
    crowd_tokens = (256 // teacher.token_stride) ** 2 + int(teacher.has_cls)
    n, d_t = grid[0] * grid[1], teacher.width

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    views = dict(global_view=randn(BATCH, 3, 256, 128), local_views=randn(BATCH, num_local, 3, 128, 96),
                 crowd_view=randn(BATCH, 3, 256, 256))
    targets = dict(global_target=randn(BATCH, d_t), local_target=randn(BATCH, n, d_t),
                   local_mask=torch.rand(BATCH, n, generator=generator, dtype=dtype),
                   relation_target=relation_matrix(randn(BATCH, crowd_tokens, 8)))
    return views, targets


def _build(recipe, dtype=torch.float32):
    torch.manual_seed(0)
    return build_student(recipe).to(dtype), DynamicPatternDecoder(recipe.decoder).to(dtype)


def _separate_calls(student, decoder, teacher, views, targets, moe_loss_weight):
    """Spec section 5's call list one call at a time, losses as in spec section 6."""
    out = student(views["global_view"])
    calls = [decoder(out.cls, 0)]
    for crop in views["local_views"].unbind(1):
        calls.append(decoder(student(crop).cls, 0))
    globals_ = [c.y[:, 0] for c in calls]
    calls.append(decoder(student.local_tokens(out, teacher), 1))
    local_y = calls[-1].y
    calls.append(decoder(student.relation_tokens(student(views["crowd_view"]), teacher), 2))
    terms = dict(global_=global_loss(globals_, targets["global_target"]),
                 local=local_loss(local_y, targets["local_target"], targets["local_mask"]),
                 relation=relation_kl_reference(calls[-1].y, targets["relation_target"]),
                 moe=torch.stack([c.aux_loss for c in calls]).mean(),
                 experts=torch.stack([c.experts_loss for c in calls]).mean())
    terms["global"] = terms.pop("global_")
    terms["total"] = (terms["global"] + terms["local"] + terms["relation"] + moe_loss_weight * terms["moe"]
                      + terms["experts"])
    return terms


@pytest.mark.parametrize("name", ["path-b_vit-ti", "solider-b_swin-t"])
def test_matches_separate_decoder_calls_in_float64(name):
    recipe = _small_decoder_recipe(name)
    student, decoder = _build(recipe, torch.float64)
    student.eval()  # Swin drop-path would draw different paths in the two computations
    views, targets = _inputs(recipe, torch.Generator().manual_seed(1), dtype=torch.float64)
    got = distill_step_losses(student, decoder, recipe.teacher, **views, **targets, moe_loss_weight=0.1)
    expected = _separate_calls(student, decoder, recipe.teacher, views, targets, 0.1)
    assert set(got) == {"global", "local", "relation", "moe", "experts", "total"}
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", ["path-l_vit-b", "path-b_swin-s"])
def test_gradients_reach_every_student_and_decoder_parameter(name):
    recipe = _small_decoder_recipe(name)
    student, decoder = _build(recipe)
    with torch.no_grad():  # off their zero init, which leaves one weight's first gradient at exactly zero
        decoder.pattern_queries.normal_()
    views, targets = _inputs(recipe, torch.Generator().manual_seed(2))
    terms = distill_step_losses(student, decoder, recipe.teacher, **views, **targets, moe_loss_weight=0.01)
    for key, value in terms.items():
        assert value.shape == () and torch.isfinite(value), key
    terms["total"].backward()
    for module in (student, decoder):
        for param_name, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{param_name} got no gradient"


def test_int8_targets_with_scales_equal_their_dequantized_floats():
    recipe = get_recipe("path-b_vit-ti")
    student, decoder = _build(recipe)
    student.eval()
    views, targets = _inputs(recipe, torch.Generator().manual_seed(3), num_local=1)
    local_scale = targets["local_target"].abs().amax(-1) / 127
    local_q = torch.round(targets["local_target"] / local_scale[..., None]).to(torch.int8)
    relation_scale = targets["relation_target"].amax(-1) / 127
    relation_q = torch.round(targets["relation_target"] / relation_scale[..., None]).to(torch.int8)
    with torch.no_grad():
        quantized = distill_step_losses(
            student, decoder, recipe.teacher, **views, global_target=targets["global_target"],
            local_target=local_q, local_scale=local_scale, local_mask=targets["local_mask"],
            relation_target=relation_q, relation_scale=relation_scale, moe_loss_weight=0.1)
        floats = distill_step_losses(
            student, decoder, recipe.teacher, **views, global_target=targets["global_target"],
            local_target=local_q.float() * local_scale[..., None], local_mask=targets["local_mask"],
            relation_target=relation_q.float() * relation_scale[..., None], moe_loss_weight=0.1)
    for key in floats:
        torch.testing.assert_close(quantized[key], floats[key], msg=key)


def test_without_local_crops_and_with_mismatched_targets():
    recipe = get_recipe("path-b_vit-ti")
    student, decoder = _build(recipe)
    views, targets = _inputs(recipe, torch.Generator().manual_seed(4), num_local=0)
    with torch.no_grad():
        terms = distill_step_losses(student, decoder, recipe.teacher, **views, **targets, moe_loss_weight=0.1)
        assert torch.isfinite(terms["total"])
        bad = dict(targets, local_target=targets["local_target"][:, :-1], local_mask=targets["local_mask"][:, :-1])
        with pytest.raises(ValueError, match="local target"):
            distill_step_losses(student, decoder, recipe.teacher, **views, **bad, moe_loss_weight=0.1)
        bad = dict(targets, relation_target=relation_matrix(torch.randn(BATCH, 256, 4)))
        with pytest.raises(ValueError, match="relation target"):
            distill_step_losses(student, decoder, recipe.teacher, **views, **bad, moe_loss_weight=0.1)

