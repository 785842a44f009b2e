"""The students' fixed bicubic resizes as GEMMs: equal to F.interpolate, and deterministic in backward.

`torch.use_deterministic_algorithms(True)` (`train_student --deterministic`) refuses F.interpolate's
bicubic backward on CUDA; on this CPU the refusal cannot be seen, so the tests check instead that no
bicubic-upsample node is left in the students' autograd graphs.
"""
import pytest
import torch
import torch.nn.functional as F

from dpal.recipes import get_recipe
from dpal.resize import bicubic_resize
from dpal.students import build_student

# (input grid, output grid, antialias): the ViT position grid (16x8) to the local crop (8x6), the crowd
# view (16x16) and a smaller grid; the Swin 2x upsample of its global (8x4), local (4x3) and crowd (8x8)
# final grids; and a size pair off the recipes.
RESIZES = [((16, 8), (8, 6), True), ((16, 8), (16, 16), True), ((16, 8), (4, 3), True), ((7, 5), (9, 13), True),
           ((8, 4), (16, 8), False), ((4, 3), (8, 6), False), ((8, 8), (16, 16), False), ((5, 7), (11, 3), False)]


@pytest.mark.parametrize("before,after,antialias", RESIZES)
def test_equals_interpolate(before, after, antialias):
    grid = torch.randn(3, *before, 10, dtype=torch.float64)
    expected = F.interpolate(grid.permute(0, 3, 1, 2), size=after, mode="bicubic", align_corners=False,
                             antialias=antialias).permute(0, 2, 3, 1)
    resized = bicubic_resize(grid, after, antialias=antialias)
    assert resized.dtype == torch.float64 and resized.shape == expected.shape
    # The GEMMs run in float32 (as timm's resize does), so the match is to float32 rounding.
    assert ((resized - expected).norm() / expected.norm()).item() < 1e-6


def _graph_ops(tensor: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("recipe,image_size", [("path-b_vit-ti", (128, 96)), ("path-b_vit-ti", (256, 256)),
                                               ("path-b_swin-t", (256, 128))])
def test_student_backward_is_deterministic(recipe, image_size):
    recipe = get_recipe(recipe)
    torch.manual_seed(0)
    student = build_student(recipe)
    images = torch.randn(2, 3, *image_size)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = student(images)
        tokens = student.relation_tokens(out, recipe.teacher)
        ops = _graph_ops(tokens)
        assert not {op for op in ops if "Upsample" in op}, ops
        tokens.square().mean().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert student.backbone.patch_embed.proj.weight.grad is not None
    if student.arch == "vit":
        assert student.backbone.pos_embed.grad.abs().sum() > 0
