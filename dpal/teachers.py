"""Frozen teachers (spec section 1): PATH-B / PATH-L on timm's VisionTransformer, SOLIDER-B on timm's Swin, and
any timm ViT or Swin named `timm:NAME` (`dpal.timm_backbones`).

A teacher turns normalized images into its final-norm tokens (`Teacher.forward`) and a global view plus a
crowd view into the three distillation targets (`teacher_targets`). Checkpoint layouts live in
`dpal.checkpoints`; this module builds the matching timm model and loads it exactly (every key used,
every shape checked, otherwise a `CheckpointError` naming the keys).
"""
from __future__ import annotations

import argparse
import math
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dpal.checkpoints import (
    LAYOUT_SOLIDER,
    CheckpointError,
    load_checkpoint_file,
    load_exact,
    path_to_timm,
    pos_embed_grid,
    solider_backbone,
    solider_to_timm,
    timm_to_path_release,
    timm_to_solider_release,
)
from dpal.config import TeacherSpec
from dpal.losses import relation_matrix
from dpal.recipes import TEACHERS
from dpal.swin import SWIN_WINDOW, PaddedWindowBlock, use_padded_windows
from dpal.timm_backbones import ACCEPTED, BackboneError, is_timm_name, load_backbone_weights, timm_teacher_spec
from dpal.timm_backbones import create_model as create_timm_model

_DEFAULT_VIT_POS_GRID = 14  # timm's ViT/16 at 224: the grid PATH-B's released pos_embed has


class TeacherTokens(NamedTuple):
    tokens: torch.Tensor  # [B, T, D_t] after the final norm; ViT: CLS first
    grid: tuple[int, int]  # (h, w) of the patch tokens


class TeacherTargets(NamedTuple):
    global_: torch.Tensor  # [B, D_t]: CLS (ViT) or mean of final tokens (Swin)
    local: torch.Tensor  # [B, N, D_t]: patch tokens of the global view
    relation: torch.Tensor  # [B, Nc, Nc] float32 row probabilities over all crowd-view tokens


class _SoliderWindowBlock(PaddedWindowBlock):
    """A timm Swin block's layers with SOLIDER's (mmdet's) window layout for grids that are not window multiples.

    mmdet pads the feature map to window multiples first and then shifts, so the padded positions take part in
    the shifted windows; timm shifts first and pads afterwards, which groups different tokens at 256x128
    (stage grids 64x32 ... 8x4, none a multiple of 7). The teacher must reproduce SOLIDER's features.
    """

    def _shift_and_mask_grid(self, height: int, width: int, padded_h: int, padded_w: int):
        return tuple(self.shift_size), (padded_h, padded_w)  # padded positions are ordinary tokens here


def interpolate_pos_encoding(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The teacher's position embedding [1, 1+OH*OW, D] (CLS position first, square stored grid) resized to
    a view's patch grid (h0, w0) as the original resized it (DINO's `interpolate_pos_encoding`, spec 1):
    bicubic with scale_factor ((h0 + 0.1) / OH, (w0 + 0.1) / OW), align_corners False, no antialias; the CLS
    position is kept. The scale factor, not the exact size, sets the sampling positions, so this differs
    from resizing to (h0, w0); the 0.1 only makes floor(OH * scale) come out as h0."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    height, width = grid
    if (height, width) == (side, side):
        return pos_embed  # DINO returns the stored embedding unchanged at its own grid
    stored = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(stored, scale_factor=((height + 0.1) / side, (width + 0.1) / side), mode="bicubic",
                            align_corners=False)
    return torch.cat([pos_embed[:, :1], resized.flatten(2).transpose(1, 2)], dim=1)


class _DinoPositionViT(VisionTransformer):
    """timm's ViT (dynamic_img_size: patch tokens arrive as [B, H, W, D]) with the position grid resized by
    `interpolate_pos_encoding` instead of timm's antialiased resample: the targets the original computed."""

    # Overrides timm's private `_pos_embed`: timm offers no public hook for how the position grid is resized.
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, channels)], dim=1)
        return self.pos_drop(tokens + interpolate_pos_encoding(self.pos_embed, (height, width)))


class Teacher(nn.Module):
    """A frozen teacher backbone (timm model in `.model`, timm state-dict names); always in eval mode."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, *, semantic_weight: float | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.semantic_weight = semantic_weight  # SOLIDER's s folded into the weights (None for ViTs)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        # Project choice (spec section 1): the teacher never runs drop-path or dropout, whatever the caller does.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> TeacherTokens:
        height, width = images.shape[-2:]
        stride = self.spec.token_stride
        if images.dim() != 4 or height % stride or width % stride:
            raise ValueError(f"{self.spec.name} needs images [B, 3, H, W] with H and W multiples of {stride}, "
                             f"got {tuple(images.shape)}")
        features = self.model.forward_features(images)
        if self.spec.arch == "vit":
            # The position grid follows this view's grid: as the original resized it (_DinoPositionViT, the
            # PATH teachers), or as timm does for its own model (timm:NAME).
            prefix = self.model.num_prefix_tokens
            if prefix != int(self.spec.has_cls):  # register tokens (timm ViTs): neither CLS nor on the grid
                patches = features[:, prefix:]
                features = torch.cat([features[:, :1], patches], dim=1) if self.spec.has_cls else patches
            return TeacherTokens(features, (height // stride, width // stride))
        batch, grid_h, grid_w, channels = features.shape
        return TeacherTokens(features.reshape(batch, grid_h * grid_w, channels), (grid_h, grid_w))


def teacher_spec(name: str | TeacherSpec, teachers: dict[str, TeacherSpec] = TEACHERS) -> TeacherSpec:
    """A teacher name of `teachers` (default dpal.recipes.TEACHERS, where `dpal.register_teacher` adds), a timm
    name `timm:NAME` (described by the model timm builds), or a TeacherSpec (its width/depth/heads define the
    model)."""
    if isinstance(name, TeacherSpec):
        return name
    if is_timm_name(name):
        return timm_teacher_spec(name)
    try:
        return teachers[name]
    except KeyError:
        raise BackboneError(f"unknown teacher {name!r}; accepted: {', '.join(teachers)}, or {ACCEPTED}") from None


def _swin_stages(spec: TeacherSpec) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Swin family layout from the spec: depths (2, 2, depth-6, 2), heads doubling to num_heads, width/8 embed."""
    if spec.depth <= 6 or spec.width % 8 or spec.num_heads % 8:
        raise ValueError(f"{spec.name}: a Swin teacher needs depth > 6 and width, num_heads divisible by 8")
    heads = tuple(spec.num_heads // 2 ** (3 - i) for i in range(4))
    return (2, 2, spec.depth - 6, 2), heads, spec.width // 8


def _create_model(spec: TeacherSpec, *, pos_grid: int = _DEFAULT_VIT_POS_GRID) -> nn.Module:
    if is_timm_name(spec.name):
        return create_timm_model(spec, drop_path_rate=0.0)
    if spec.arch == "vit":
        # The spec gives every architecture argument, so timm builds the subclass itself (timm's init and names).
        return build_model_with_cfg(
            _DinoPositionViT, spec.timm_name, pretrained=False, num_classes=0, img_size=pos_grid * spec.patch_size,
            patch_size=spec.patch_size, embed_dim=spec.width, depth=spec.depth, num_heads=spec.num_heads,
            qkv_bias=True, dynamic_img_size=True, drop_path_rate=0.0)
    if spec.arch != "swin":
        raise ValueError(f"{spec.name}: unknown teacher architecture {spec.arch!r} (expected 'vit' or 'swin')")
    depths, heads, embed_dim = _swin_stages(spec)
    # always_partition keeps 7x7 windows (and shift 3) on grids smaller than a window, as SOLIDER does.
    model = timm.create_model(
        spec.timm_name, pretrained=False, num_classes=0, patch_size=spec.patch_size, embed_dim=embed_dim,
        depths=depths, num_heads=heads, window_size=SWIN_WINDOW, strict_img_size=False, always_partition=True,
        drop_path_rate=0.0)
    use_padded_windows(model, _SoliderWindowBlock)  # same parameters, SOLIDER's pad-then-shift windows
    for stage in model.layers:
        if not isinstance(stage.downsample, nn.Identity):
            # SOLIDER's semantic-weight affine after each downsample is folded into the reduction: it needs a bias.
            old = stage.downsample.reduction
            stage.downsample.reduction = nn.Linear(old.in_features, old.out_features, bias=True)
            with torch.no_grad():
                stage.downsample.reduction.weight.copy_(old.weight)
                stage.downsample.reduction.bias.zero_()
    return model


def build_teacher(name: str | TeacherSpec, *, semantic_weight: float = 0.0) -> Teacher:
    """A randomly initialised, frozen teacher (timm init); SOLIDER's semantic weight is recorded only."""
    spec = teacher_spec(name)
    if not 0.0 <= semantic_weight <= 1.0:
        raise ValueError(f"semantic_weight must lie in [0, 1] (SOLIDER's s), got {semantic_weight}")
    solider = spec.arch == "swin" and not is_timm_name(spec.name)
    return Teacher(spec, _create_model(spec), semantic_weight=semantic_weight if solider else None)


SOLIDER_CONTAINERS = ("teacher", "student")


def teacher_options(name: str | TeacherSpec, *, solider_weights: str = "teacher",
                    semantic_weight: float = 0.0) -> dict:
    """The `load_teacher` keyword arguments that change this teacher's outputs, validated: SOLIDER's weight
    container and semantic weight, nothing for PATH. Stores record them, so targets are never mixed."""
    spec = teacher_spec(name)
    if spec.arch != "swin" or is_timm_name(spec.name):
        if solider_weights != "teacher" or semantic_weight != 0.0:
            raise ValueError(f"--solider-weights and --semantic-weight apply to SOLIDER teachers only, not {spec.name}")
        return {}
    if solider_weights not in SOLIDER_CONTAINERS:
        raise ValueError(f"solider_weights must be one of {', '.join(SOLIDER_CONTAINERS)}, got {solider_weights!r}")
    if not 0.0 <= semantic_weight <= 1.0:
        raise ValueError(f"semantic_weight must lie in [0, 1], got {semantic_weight}")
    return {"solider_weights": solider_weights, "semantic_weight": float(semantic_weight)}


def load_teacher(name: str | TeacherSpec, path, *, solider_weights: str = "teacher",
                 semantic_weight: float = 0.0) -> Teacher:
    """Load a released checkpoint (any layout of spec section 1) into a frozen, eval-mode teacher.

    solider_weights picks SOLIDER's 'teacher' (default, as SOLIDER's tools) or 'student' container;
    semantic_weight is SOLIDER's s in [0, 1] folded into the weights (default 0.0, as the original DPAL).
    """
    spec = teacher_spec(name)
    if is_timm_name(spec.name):
        teacher_options(spec, solider_weights=solider_weights, semantic_weight=semantic_weight)
        model = _create_model(spec)
        load_backbone_weights(model, path, spec.name)
        return Teacher(spec, model)
    checkpoint = load_checkpoint_file(path)
    if spec.arch == "vit":
        state_dict, layout = path_to_timm(checkpoint, path)
        model = _create_model(spec, pos_grid=pos_embed_grid(state_dict, path, layout))
    else:
        layout = f"{LAYOUT_SOLIDER} (container {solider_weights!r})"
        state_dict = solider_to_timm(solider_backbone(checkpoint, path, weights=solider_weights), path,
                                     semantic_weight=semantic_weight)
        model = _create_model(spec)
    load_exact(model, state_dict, path, layout, spec.name,
               detail=f" ({spec.arch}, width {spec.width}, depth {spec.depth}); key names below are after "
                      "mapping onto timm's modules")
    return Teacher(spec, model, semantic_weight=semantic_weight if spec.arch == "swin" else None)


@torch.no_grad()
def global_view_targets(teacher: Teacher, global_views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global target [B,D], patch tokens [B,N,D]) of the global views, float32: a third of a full teacher
    pass, all the shape-mask calibration needs."""
    tokens = teacher(global_views).tokens.float()
    if teacher.spec.has_cls:
        return tokens[:, 0], tokens[:, 1:]
    return tokens.mean(dim=1), tokens


@torch.no_grad()
def teacher_targets(teacher: Teacher, global_views: torch.Tensor, crowd_views: torch.Tensor) -> TeacherTargets:
    """Per view set: global target, patch tokens of the global view, relation over all crowd-view tokens."""
    global_, local = global_view_targets(teacher, global_views)
    relation = relation_matrix(teacher(crowd_views).tokens.float())
    return TeacherTargets(global_.contiguous(), local.contiguous(), relation)


def release_checkpoint(teacher: Teacher) -> dict:
    """The teacher's weights in a real released layout: raw PATH multitask, SOLIDER's mmdet layout, or timm's
    state dict for a `timm:NAME` teacher."""
    state_dict = {k: v.detach().cpu() for k, v in teacher.model.state_dict().items()}
    if is_timm_name(teacher.spec.name):
        return state_dict  # timm's own layout: what a `timm:NAME` teacher loads
    if teacher.spec.arch == "vit":
        return timm_to_path_release(state_dict)
    index = {f"layers.{i}.blocks.{j}.": block.attn.relative_position_index.cpu()
             for i, stage in enumerate(teacher.model.layers) for j, block in enumerate(stage.blocks)}
    args = argparse.Namespace(arch=teacher.spec.timm_name, semantic_weight=teacher.semantic_weight)
    return timm_to_solider_release(state_dict, relative_position_index=index, args=args)


__all__ = ["CheckpointError", "Teacher", "TeacherTargets", "TeacherTokens", "build_teacher", "interpolate_pos_encoding",
           "load_teacher", "release_checkpoint", "teacher_spec", "teacher_targets"]
