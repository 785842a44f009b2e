"""Training checkpoints of the original DPAL code -> this project's student and decoder (spec section 7).

The original saves `{'student': DDP state dict ('module.' prefix), 'teacher': the EMA copy (no prefix),
'optimizer', 'epoch', 'args': argparse.Namespace}`. Inside a container, the ViT backbone is under
`backbone.` with timm's names (plus `inter_norm`, an intermediate-layer norm nothing reads) and the
decoder is under `adapter.` with the names of the original `LossMOEDecoder`. The backbone keys are
already `Student`'s; the decoder keys are renamed onto `DynamicPatternDecoder` (table below). Only ViT
students are covered: the original Swin students used an mmdet Swin with different windows and a
different decoder width (spec section 2), so they have no equivalent here.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from dpal.checkpoints import CheckpointError, load_checkpoint_file
from dpal.config import Recipe
from dpal.decoder import DynamicPatternDecoder
from dpal.recipes import get_recipe
from dpal.students import Student, build_student, materialize

ORIGINAL_LAYOUT = ("original DPAL training checkpoint {'student': {'module.backbone.<timm ViT name>', "
                   "'module.adapter.<LossMOEDecoder name>'}, 'teacher': the EMA copy (same keys without "
                   "'module.'), 'optimizer', 'epoch', 'args'}")
CONTAINERS = {"student": "student", "ema": "teacher"}  # our name for the weights -> the original's key

# args.model of the original's training scripts -> this project's recipe.
ORIGINAL_MODELS = {
    "DPAL_kd_vit_tiny_patch16_moe": "path-b_vit-ti",
    "DPAL_kd_vit_small_patch16_moe": "path-b_vit-s",
    "DPAL_kd_vit_tiny_patch16_moe_path_large": "path-l_vit-ti",
    "DPAL_kd_vit_base_patch16_moe_path_large": "path-l_vit-b",
}

# DynamicPatternDecoder name (prefix) -> the original adapter's. The original's `attn` / `attn2` are
# timm-style attentions whose fused qkv rows are [q; k; v] like nn.MultiheadAttention's in_proj.
DECODER_NAMES = {
    "down_proj.": "down_dim.",
    "down_norm.": "norm1.",  # LayerNorm after the down-projection (inter_dim only)
    "token_attn.in_proj_weight": "attn.qkv.weight",
    "token_attn.in_proj_bias": "attn.qkv.bias",
    "token_attn.out_proj.": "attn.proj.",
    "token_norm.": "norm2.",
    "gate_token": "gate.moe_tokens",  # [1, 1, D] there, [D] here
    "gate_norm.": "gate.norm.",
    "gate_attn.": "gate.cross_attn.",
    "gate_weight": "gate.weight",
    "pattern_queries": "pattern_queries",  # [1, P, D] there, [P, D] here
    "query_self_attn.in_proj_weight": "attn2.qkv.weight",
    "query_self_attn.in_proj_bias": "attn2.qkv.bias",
    "query_self_attn.out_proj.": "attn2.proj.",
    "query_cross_norm.": "norm4.",
    "query_cross_attn.": "cross_attn.",
    "expert_query_norm.": "norm5.",
    "expert_proj.": "mlp.0.",
    "expert_norm.": "mlp.2.",
    "out_norm.": "after_experts.norm.",
}
_RESHAPED = {"gate_token", "pattern_queries"}
# Parameters the original creates but never uses in its forward.
_UNUSED_ADAPTER = ("norm3.", "expert_norm.")
_UNUSED_ADAPTER_WITHOUT_INTER_DIM = ("norm1.",)
_UNUSED_BACKBONE = ("inter_norm.",)


class OriginalCheckpoint(NamedTuple):
    recipe: Recipe
    student: Student  # eval mode
    decoder: DynamicPatternDecoder  # eval mode
    epoch: int | None  # epochs completed, as the original stores it


def _original_name(name: str) -> str:
    for ours, original in DECODER_NAMES.items():
        if name == ours or (ours.endswith(".") and name.startswith(ours)):
            return original + name[len(ours):]
    raise KeyError(f"decoder parameter {name!r} has no counterpart in the original DPAL adapter; "
                   f"dpal.compat.DECODER_NAMES must be updated with dpal.decoder")


def resolve_recipe(checkpoint: dict, recipe: Recipe | str | None, path) -> Recipe:
    """The recipe of an original checkpoint: given, or from its args.model; both must agree when present."""
    model_name = getattr(checkpoint.get("args"), "model", None)
    from_args = ORIGINAL_MODELS.get(model_name) if model_name is not None else None
    if isinstance(model_name, str) and "swin" in model_name.lower():
        raise CheckpointError(path, ORIGINAL_LAYOUT, f"args.model {model_name!r} is a Swin student; only the "
                              f"original's ViT students can be converted (its Swin students have no equivalent here)")
    if recipe is None:
        if from_args is None:
            known = ", ".join(f"{k} -> {v}" for k, v in ORIGINAL_MODELS.items())
            raise CheckpointError(path, ORIGINAL_LAYOUT,
                                  f"cannot tell the recipe: args.model is {model_name!r} (known: {known}); "
                                  f"pass the recipe explicitly")
        return get_recipe(from_args)
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.student.arch != "vit":
        raise CheckpointError(path, ORIGINAL_LAYOUT, f"recipe {recipe.name} has a Swin student; only the "
                              f"original's ViT students can be converted")
    if from_args is not None and from_args != recipe.name:
        raise CheckpointError(path, ORIGINAL_LAYOUT,
                              f"args.model {model_name!r} was trained as recipe {from_args!r}, not {recipe.name!r} "
                              f"(the last block's head count differs between them)")
    return recipe


def convert_original_state(container: dict, recipe: Recipe, student: Student, decoder: DynamicPatternDecoder,
                           path, container_name: str) -> tuple[dict, dict]:
    """One container (student or EMA) -> (Student state dict, DynamicPatternDecoder state dict).

    Every tensor must be used or be one the original never reads, and every parameter of the two modules
    must be found, with its shape; otherwise a CheckpointError lists the keys under their original names."""
    prefix = "module." if container and all(k.startswith("module.") for k in container) else ""
    state = {k[len(prefix):]: v for k, v in container.items()}
    where = f"{container_name!r} container"
    if any(k.startswith("backbone.stages.") or k.startswith("backbone.layers.") for k in state):
        raise CheckpointError(path, ORIGINAL_LAYOUT, f"{where} holds a Swin backbone; only the original's ViT "
                              f"students can be converted (its Swin students have no equivalent here)")

    unused = _UNUSED_ADAPTER + (() if recipe.student.inter_dim else _UNUSED_ADAPTER_WITHOUT_INTER_DIM)
    ignored = {k for k in state if k.startswith(tuple("backbone." + u for u in _UNUSED_BACKBONE))
               or k.startswith(tuple("adapter." + u for u in unused))}
    student_state, decoder_state, wanted, wrong = {}, {}, set(), []
    for target, module, source_of in ((student_state, student, lambda k: k),
                                      (decoder_state, decoder, lambda k: "adapter." + _original_name(k))):
        for name, expected in module.state_dict().items():
            source = source_of(name)
            wanted.add(source)
            if source not in state:
                continue
            value = state[source]
            if name in _RESHAPED and value.numel() == expected.numel():
                value = value.reshape(expected.shape)
            if value.shape != expected.shape:
                wrong.append(f"{prefix}{source} (file {list(value.shape)}, {recipe.name} needs "
                             f"{list(expected.shape)})")
            target[name] = value
    missing = [prefix + k for k in sorted(wanted - set(state))]
    unexpected = [prefix + k for k in sorted(set(state) - wanted - ignored)]
    if missing or unexpected or wrong:
        problem = f"{where} does not match recipe {recipe.name}"
        if wrong:
            problem += f"; wrong shapes ({len(wrong)}): " + ", ".join(wrong[:8])
        raise CheckpointError(path, ORIGINAL_LAYOUT, problem, missing=missing, unexpected=unexpected)
    return student_state, decoder_state


def load_original_checkpoint(path, recipe: Recipe | str | None = None, *, weights: str = "student"
                             ) -> OriginalCheckpoint:
    """Build this project's student and decoder from an original DPAL training checkpoint.

    recipe: a Recipe or its name; default: from the checkpoint's args.model. weights: 'student' (the
    trained weights) or 'ema' (the original's EMA copy, saved under 'teacher'). The student can then be
    exported with `formats.exports.export_student`."""
    if weights not in CONTAINERS:
        raise ValueError(f"weights must be one of {', '.join(CONTAINERS)}, got {weights!r}")
    path = Path(path)
    checkpoint = load_checkpoint_file(path, ORIGINAL_LAYOUT)
    container_name = CONTAINERS[weights]
    container = checkpoint.get(container_name)
    if not isinstance(container, dict) or not all(isinstance(v, torch.Tensor) for v in container.values()):
        top = ", ".join(repr(k) for k in list(checkpoint)[:12])
        raise CheckpointError(path, ORIGINAL_LAYOUT,
                              f"no {container_name!r} dict of tensors (weights={weights!r}); top-level keys: {top}")
    recipe = resolve_recipe(checkpoint, recipe, path)
    with torch.device("meta"):  # every parameter comes from the checkpoint: skip the random init
        student, decoder = build_student(recipe), DynamicPatternDecoder(recipe.decoder)
    student, decoder = materialize(student), materialize(decoder)
    student_state, decoder_state = convert_original_state(container, recipe, student, decoder, path, container_name)
    student.load_state_dict(student_state, strict=True)
    decoder.load_state_dict(decoder_state, strict=True)
    epoch = checkpoint.get("epoch")
    return OriginalCheckpoint(recipe, student.eval(), decoder.eval(), int(epoch) if epoch is not None else None)


__all__ = ["DECODER_NAMES", "ORIGINAL_LAYOUT", "ORIGINAL_MODELS", "OriginalCheckpoint", "convert_original_state",
           "load_original_checkpoint", "resolve_recipe"]
