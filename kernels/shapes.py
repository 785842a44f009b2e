"""Every shape the fused ops run at, in one place: the compile sweep, the benchmark and the kernel tests read it.

The recipes' calls come from `dpal.config.Recipe.fused_calls` (the calls `dpal.distill.distill_step_losses`
makes); the tests' small shapes are chosen for what they exercise (ragged tiles, L = 1, several row blocks)
and run in the interpreter on a CPU and compiled on a GPU, so the sweep compiles them too.
"""
from __future__ import annotations

from dpal.recipes import RECIPES

TARGET_RECIPE = "path-b_vit-ti"  # the speed and memory targets are stated at its shapes
CUDA_TEST_BATCH = 64  # the kernel tests' batch at the recipes' shapes (the float64 reference must fit)

# Decoder (B, P, D, D_o, L): ragged column tiles (D*D_o not a multiple of 128), ragged K (D not a power of
# two), L = 1 (CLS-only calls), B > 64 for more than one row block, D_o = 24 (output rows in three segments);
# (5, 3, 24, 20, 7) takes a float32 expert weight with bf16 activations, (5, 3, 20, 30, 4) a chunked backward.
DECODER_TEST_SHAPES = ((3, 3, 16, 8, 1), (5, 3, 24, 24, 7), (4, 3, 12, 44, 9), (67, 3, 8, 20, 2),
                       (5, 3, 24, 20, 7), (5, 3, 20, 30, 4))
# Relation (B, N, D): tiny N, N not a block multiple (tail blocks only; full blocks and a tail of 3), N = 64.
RELATION_TEST_SHAPES = ((2, 3, 8), (2, 5, 16), (3, 70, 40), (2, 131, 40), (2, 64, 24))


def decoder_calls(batch: int | None = None, recipes=None) -> dict[tuple[int, int, int, int, int], list[str]]:
    """(B, P, D, D_o, L) of every decoder call of `recipes` (default: all) at `batch` samples per GPU (default:
    each recipe's), with the recipes that make it."""
    calls: dict[tuple, list[str]] = {}
    for name in recipes or RECIPES:
        recipe = RECIPES[name]
        for rows, tokens, dim, out_dim in recipe.fused_calls(batch).decoder:
            calls.setdefault((rows, recipe.decoder.num_patterns, dim, out_dim, tokens), []).append(name)
    return calls


def relation_calls(batch: int | None = None, recipes=None) -> dict[tuple[int, int, int], list[str]]:
    """(B, N, D) of every relation-loss call of `recipes` (default: all), with the recipes that make it."""
    calls: dict[tuple, list[str]] = {}
    for name in recipes or RECIPES:
        calls.setdefault(RECIPES[name].fused_calls(batch).relation, []).append(name)
    return calls
