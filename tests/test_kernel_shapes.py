"""The shapes the fused kernels are compiled, benchmarked and tested at are the ones training calls them at.

`dpal.config.Recipe.fused_calls` states them; these tests check it against what `distill_step_losses` really
does for each of the eight recipes (shape-only tensors: no memory, no arithmetic), and that the sm_90 sweep
and the benchmark cover every one of them.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dpal.decoder import DynamicPatternDecoder
from dpal.distill import distill_step_losses
from dpal.recipes import RECIPES
from dpal.students import build_student
from kernels import bench, shapes, sweep


def _step_calls(recipe, batch):
    """(decoder (rows, tokens, D, D_o) per call, relation (B, N, D)) of one distill_step_losses run."""
    with torch.device("meta"):  # built without memory; run on shape-only CPU tensors
        student, decoder = build_student(recipe), DynamicPatternDecoder(recipe.decoder)
    calls = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        student, decoder = student.to_empty(device="cpu"), decoder.to_empty(device="cpu")
        decoder.register_forward_hook(lambda module, args, out: calls.append(
            (args[0].shape[0], args[0].shape[1], recipe.decoder.in_dim, out.y.shape[-1])))
        teacher, views = recipe.teacher, recipe.views
        grid = (views.global_size[0] // teacher.token_stride) * (views.global_size[1] // teacher.token_stride)
        crowd = (views.crowd_size[0] // teacher.token_stride) * (views.crowd_size[1] // teacher.token_stride) \
            + teacher.has_cls
        terms = distill_step_losses(
            student, decoder, teacher, global_view=torch.empty(batch, 3, *views.global_size),
            local_views=torch.empty(batch, views.num_local, 3, *views.local_size),
            crowd_view=torch.empty(batch, 3, *views.crowd_size), global_target=torch.empty(batch, teacher.width),
            local_target=torch.empty(batch, grid, teacher.width), local_mask=torch.empty(batch, grid),
            relation_target=torch.empty(batch, crowd, crowd), moe_loss_weight=0.1)
        assert terms.relation.shape == ()
    relation_shape = (batch, calls[-1][1], calls[-1][3])  # the relation loss takes the last call's output
    return tuple(calls), relation_shape


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_fused_calls_are_the_calls_a_step_makes(name):
    recipe = RECIPES[name]
    decoder_calls, relation = _step_calls(recipe, batch=2)
    planned = recipe.fused_calls(batch=2)
    assert decoder_calls == planned.decoder
    assert relation == planned.relation


def test_sweep_and_bench_cover_every_call_of_every_recipe():
    decoder, relation = sweep.sweep_shapes(quick=False)
    for recipe in RECIPES.values():
        calls = recipe.fused_calls()
        for rows, tokens, dim, out_dim in calls.decoder:
            assert (rows, recipe.decoder.num_patterns, dim, out_dim, tokens) in decoder
        assert calls.relation in relation
    # The kernel tests' shapes, which run compiled on a GPU, are compiled too.
    assert set(shapes.DECODER_TEST_SHAPES) <= set(decoder) and set(shapes.RELATION_TEST_SHAPES) <= set(relation)
    # SOLIDER-B's tokens: L = 32 (8 x 4 global grid) and 64 (8 x 8 crowd grid), no CLS.
    assert {tokens for _, _, _, _, tokens in decoder if tokens in (32, 64)} == {32, 64}
    benched = {(c.op, tuple(c.shape[k] for k in ("batch", "tokens", "dim")) + ((c.shape["out_dim"],) if
                c.op == "decoder" else ())) for c in bench.build_cases(True, None, False, "cpu")}
    for recipe in RECIPES.values():
        calls = recipe.fused_calls()
        assert {("decoder", (rows, tokens, dim, out_dim)) for rows, tokens, dim, out_dim in calls.decoder} <= benched
        assert ("relation", calls.relation) in benched
