"""distill_step_losses: real students and decoders, every decoder call of spec section 5, every loss."""
import dataclasses

import pytest
import torch

from dpal.decoder import DynamicPatternDecoder
from dpal.distill import distill_step_losses
from dpal.losses import LossTerms, global_loss, local_loss, quantize_relation, relation_kl_reference, relation_matrix
from dpal.recipes import get_recipe
from dpal.students import build_student


def _small_decoder_recipe(name):
    """The recipe with a narrow decoder (inter_dim 48; the recipe's expert generator alone has tens of millions
    of parameters) so that a Swin student's check costs seconds; the wiring under test is unchanged."""
    recipe = get_recipe(name)
    return dataclasses.replace(recipe, decoder=dataclasses.replace(recipe.decoder, in_dim=48))


def _build(recipe):
    torch.manual_seed(0)
    student, decoder = build_student(recipe), DynamicPatternDecoder(recipe.decoder)
    with torch.no_grad():  # off their zero init, which leaves one weight's first gradient at exactly zero
        decoder.pattern_queries.normal_()
    return student, decoder


VIEW_SIZES = ((256, 128), (128, 96), (256, 256))  # global, local, crowd, as the recipes render them
# A quarter of them (the local crop square, so that Swin's four halvings stay whole): the same wiring in a
# sixteenth of the compute. The equality with one decoder call per view is also checked at the real sizes.
SMALL_VIEW_SIZES = ((64, 32), (32, 32), (64, 64))


def _inputs(recipe, seed, batch, num_local, sizes=SMALL_VIEW_SIZES):
    teacher, generator = recipe.teacher, torch.Generator().manual_seed(seed)
    (global_h, global_w), (local_h, local_w), (crowd_h, crowd_w) = sizes
    n = (global_h // teacher.token_stride) * (global_w // teacher.token_stride)
    crowd_tokens = (crowd_h // teacher.token_stride) * (crowd_w // teacher.token_stride) + int(teacher.has_cls)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    views = dict(global_view=randn(batch, 3, global_h, global_w),
                 local_views=randn(batch, num_local, 3, local_h, local_w),
                 crowd_view=randn(batch, 3, crowd_h, crowd_w))
    targets = dict(global_target=randn(batch, teacher.width), local_target=randn(batch, n, teacher.width),
                   local_mask=torch.rand(batch, n, generator=generator),
                   relation_target=relation_matrix(randn(batch, crowd_tokens, 8)))
    return views, targets


@pytest.fixture(scope="module")
def vit_ti():
    recipe = get_recipe("path-b_vit-ti")
    student, decoder = _build(recipe)
    return recipe, student.eval(), decoder


def _separate_calls(student, decoder, teacher, views, targets, moe_loss_weight):
    """Spec section 5's call list one decoder call at a time, losses as in spec section 6."""
    out = student(views["global_view"])
    calls = [decoder(out.cls, 0)]
    for crop in views["local_views"].unbind(1):
        calls.append(decoder(student(crop).cls, 0))
    student_globals = [c.y[:, 0] for c in calls]
    calls.append(decoder(student.local_tokens(out, teacher), 1))
    local_y = calls[-1].y
    calls.append(decoder(student.relation_tokens(student(views["crowd_view"]), teacher), 2))
    terms = {"global": global_loss(student_globals, targets["global_target"]),
             "local": local_loss(local_y, targets["local_target"], targets["local_mask"]),
             "relation": relation_kl_reference(calls[-1].y, targets["relation_target"]),
             "moe": torch.stack([c.aux_loss for c in calls]).mean(),
             "experts": torch.stack([c.experts_loss for c in calls]).mean()}
    terms["total"] = (terms["global"] + terms["local"] + terms["relation"] + moe_loss_weight * terms["moe"]
                      + terms["experts"])
    return terms  # spelled out by name here, independently of `LossTerms`


def test_matches_one_decoder_call_per_view(vit_ti):
    recipe, student, decoder = vit_ti
    views, targets = _inputs(recipe, seed=1, batch=2, num_local=2, sizes=VIEW_SIZES)
    with torch.no_grad():
        got = distill_step_losses(student, decoder, recipe.teacher, **views, **targets, moe_loss_weight=0.1)
        expected = _separate_calls(student, decoder, recipe.teacher, views, targets, 0.1)
    assert isinstance(got, LossTerms) and set(got.by_name()) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got.by_name()[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_int8_targets_with_scales_equal_their_dequantized_floats(vit_ti):
    recipe, student, decoder = vit_ti
    views, targets = _inputs(recipe, seed=3, batch=2, num_local=1)
    local_scale = targets["local_target"].abs().amax(-1) / 127
    local_q = torch.round(targets["local_target"] / local_scale[..., None]).to(torch.int8)
    relation_q, relation_scale = quantize_relation(targets["relation_target"])
    common = dict(global_target=targets["global_target"], local_mask=targets["local_mask"], moe_loss_weight=0.1)
    with torch.no_grad():
        quantized = distill_step_losses(student, decoder, recipe.teacher, **views, **common,
                                        local_target=local_q, local_scale=local_scale,
                                        relation_target=relation_q, relation_scale=relation_scale)
        floats = distill_step_losses(student, decoder, recipe.teacher, **views, **common,
                                     local_target=local_q.float() * local_scale[..., None],
                                     relation_target=(relation_q.float() * relation_scale[..., None]).softmax(-1))
    for key, value in floats.by_name().items():
        torch.testing.assert_close(quantized.by_name()[key], value, msg=key)


def test_without_local_crops_and_with_mismatched_targets(vit_ti):
    recipe, student, decoder = vit_ti
    views, targets = _inputs(recipe, seed=4, batch=1, num_local=0)
    with torch.no_grad():
        terms = distill_step_losses(student, decoder, recipe.teacher, **views, **targets, moe_loss_weight=0.1)
        assert all(torch.isfinite(v) for v in terms)
        bad = dict(targets, local_target=targets["local_target"][:, :-1], local_mask=targets["local_mask"][:, :-1])
        with pytest.raises(ValueError, match="local target"):
            distill_step_losses(student, decoder, recipe.teacher, **views, **bad, moe_loss_weight=0.1)
        bad = dict(targets, relation_target=relation_matrix(torch.randn(1, 256, 4)))
        with pytest.raises(ValueError, match="relation target"):
            distill_step_losses(student, decoder, recipe.teacher, **views, **bad, moe_loss_weight=0.1)


def _check_gradients_reach_every_parameter(recipe, student, decoder):
    views, targets = _inputs(recipe, seed=2, batch=1, num_local=1)
    terms = distill_step_losses(student, decoder, recipe.teacher, **views, **targets, moe_loss_weight=0.01)
    for key, value in terms.by_name().items():
        assert value.shape == () and torch.isfinite(value), key
    terms.total.backward()
    for module in (student, decoder):
        for param_name, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{param_name} got no gradient"
            p.grad = None


def test_gradients_reach_every_parameter_vit(vit_ti):
    _check_gradients_reach_every_parameter(*vit_ti)


def test_gradients_reach_every_parameter_swin():
    # Swin: CLS slot = mean of final tokens, local and crowd tokens upsampled to the ViT teacher's grid
    recipe = _small_decoder_recipe("path-b_swin-t")
    _check_gradients_reach_every_parameter(recipe, *_build(recipe))
