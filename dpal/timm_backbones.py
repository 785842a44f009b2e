"""Teachers and students named after any timm ViT or Swin: `timm:NAME` (e.g. `timm:vit_small_patch16_224`).

Everything the method needs to know about such a backbone (width, token stride, whether a class token leads
the tokens) is read off the model timm builds for the name, never written down by hand, so a store or a run
records what the model really is and a later run rebuilds and compares the same description. The weights come
from a file the user names (safetensors, or a torch checkpoint holding tensors only) and must fit the model key
for key; the classifier head is not part of a backbone and is left out of that comparison.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.models import swin_transformer, vision_transformer
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dpal.checkpoints import CheckpointError, load_checkpoint_file, load_exact
from dpal.config import StudentSpec, TeacherSpec, ViewConfig
from dpal.errors import UserError
from dpal.recipes import TIMM_PREFIX
ACCEPTED = ("a timm VisionTransformer or SwinTransformer name, e.g. timm:vit_small_patch16_224 or "
            "timm:swin_tiny_patch4_window7_224")
TIMM_WEIGHTS_LAYOUT = ("a timm state dict of the model: a .safetensors file, or a torch file holding the state dict "
                       "itself or under 'model' / 'state_dict' (the classifier head may be present; it is not used)")
# Containers torch checkpoints commonly keep a model's state dict under.
_STATE_DICT_CONTAINERS = ("model", "state_dict")


class BackboneError(UserError):
    """A timm name the method cannot use; the message names it and what is accepted."""


def is_timm_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def timm_model_name(name: str) -> str:
    """`timm:NAME` -> NAME, refused unless timm knows NAME."""
    model_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(model_name):
        raise BackboneError(f"{name}: timm has no model named {model_name!r}; accepted: {ACCEPTED}")
    return model_name


def family_arguments(model: nn.Module) -> dict:
    """The timm arguments that let a backbone of this family take the method's view sizes (not square, not
    224): ViTs resize their position grid, Swins pad their windows."""
    return {"dynamic_img_size": True} if isinstance(model, VisionTransformer) else {"strict_img_size": False}


def describe(name: str) -> tuple[nn.Module, dict]:
    """(the model timm builds for `timm:NAME`, on the meta device: no memory, no init) and its description:
    arch, timm_name, width, depth, num_heads (ViT: every block's; Swin: the last stage's), patch_size,
    token_stride, has_cls."""
    model_name = timm_model_name(name)
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    if isinstance(model, VisionTransformer):
        patch = tuple(model.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise BackboneError(f"{name}: patches of {patch[0]}x{patch[1]} pixels give no square token grid; "
                                f"accepted: {ACCEPTED} with square patches")
        return model, {"arch": "vit", "timm_name": model_name, "width": model.num_features,
                       "depth": len(model.blocks), "num_heads": model.blocks[-1].attn.num_heads,
                       "patch_size": patch[0], "token_stride": patch[0], "has_cls": model.cls_token is not None}
    if isinstance(model, SwinTransformer):
        return model, {"arch": "swin", "timm_name": model_name, "width": model.num_features,
                       "depth": sum(len(stage.blocks) for stage in model.layers),
                       "num_heads": model.layers[-1].blocks[-1].attn.num_heads,
                       "patch_size": model.patch_embed.patch_size[0],
                       "token_stride": model.feature_info[-1]["reduction"], "has_cls": False}
    raise BackboneError(f"{name} is a {type(model).__name__}, whose tokens the method cannot use; accepted: {ACCEPTED}")


def timm_teacher_spec(name: str) -> TeacherSpec:
    """The teacher description of `timm:NAME`, read off the model timm builds."""
    return TeacherSpec(name, **describe(name)[1])


def view_size_problem(spec: TeacherSpec, cfg: ViewConfig) -> str | None:
    """Why the teacher's token grid does not tile the views it is run on (None when it does)."""
    sizes = {"global": cfg.global_size, "crowd": cfg.crowd_size}
    bad = [f"{view} {height}x{width}" for view, (height, width) in sizes.items()
           if height % spec.token_stride or width % spec.token_stride]
    if bad:
        return (f"teacher {spec.name}: its token stride {spec.token_stride} does not divide the view sizes "
                f"({', '.join(bad)}); accepted: teachers whose token stride divides "
                f"{' and '.join(f'{h}x{w}' for h, w in sizes.values())} (e.g. patch 16 or Swin stride 32)")
    return None


def create_model(spec: TeacherSpec | StudentSpec, **kwargs) -> nn.Module:
    """A randomly initialised timm model of a `timm:NAME` spec, refused if timm now builds something other than
    the spec describes (another timm version, or a description recorded by hand)."""
    meta_model, description = describe(spec.name)
    recorded = {key: getattr(spec, key) for key in description if hasattr(spec, key)}
    derived = {key: value for key, value in description.items() if key in recorded}
    if recorded != derived:
        changed = ", ".join(f"{key} {recorded[key]!r} (timm builds {derived[key]!r})"
                            for key in recorded if recorded[key] != derived[key])
        raise BackboneError(f"{spec.name}: the recorded description does not match the model timm "
                            f"{timm.__version__} builds: {changed}; use the timm version it was made with")
    return timm.create_model(description["timm_name"], pretrained=False, **{"num_classes": 0,
                             **family_arguments(meta_model), **kwargs})


def read_weights(path) -> dict[str, torch.Tensor]:
    """The state dict in a safetensors or torch file (tensors only: nothing in the file runs)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(path, TIMM_WEIGHTS_LAYOUT, "does not exist")
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError on damaged headers
            raise CheckpointError(path, TIMM_WEIGHTS_LAYOUT, f"not a readable safetensors file: {error}") from error
    checkpoint = load_checkpoint_file(path, TIMM_WEIGHTS_LAYOUT)
    for key in _STATE_DICT_CONTAINERS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def load_backbone_weights(model: nn.Module, path, name: str) -> None:
    """Load `path` into `model` key for key (a CheckpointError names the file and the first keys that differ),
    after timm's own adaptation of a checkpoint to a model of its family (a position grid saved at another image
    size is resized to the model's); the file's classifier head, which the backbone has none of, is left out."""
    classifier = model.pretrained_cfg.get("classifier", "head")
    state_dict = {key: value for key, value in read_weights(path).items()
                  if key.split(".")[0] != classifier or key in model.state_dict()}
    adapt = vision_transformer.checkpoint_filter_fn if isinstance(model, VisionTransformer) else \
        swin_transformer.checkpoint_filter_fn
    load_exact(model, adapt(state_dict, model), path, TIMM_WEIGHTS_LAYOUT, name)


__all__ = ["ACCEPTED", "TIMM_PREFIX", "BackboneError", "create_model", "describe", "is_timm_name",
           "load_backbone_weights", "read_weights", "timm_teacher_spec", "view_size_problem"]
