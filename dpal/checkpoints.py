"""Released teacher checkpoints: safe reading and the name maps between their layouts and timm's modules.

Layouts (spec section 1):

- PATH, timm names: ``{'model': {...}}`` with ``pos_embed`` [1, 1+N, D] (CLS position first).
- PATH, raw multitask: ``{'state_dict': {'module.backbone_module.<timm name>': ...}}`` whose ``pos_embed``
  holds the N grid positions only and whose CLS position is ``cls_token_pos_embed`` (zeros if absent).
- SOLIDER (mmdet Swin): ``{'teacher': {...}, 'student': {...}, 'args': argparse.Namespace, ...}`` with
  ``backbone.`` / ``module.backbone.`` keys, mmdet's unfold channel order in patch merging, and the
  semantic-weight layers ``semantic_embed_w.i`` / ``semantic_embed_b.i``.

Every function here maps plain state dicts; matching them against a model (missing / unexpected keys,
shapes) is done by ``dpal.teachers``, which knows the architecture.
"""
from __future__ import annotations

import argparse
import math
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from dpal.errors import UserError, file_problem

LAYOUT_PATH_TIMM = "PATH {'model': {<timm ViT name>: tensor}} with pos_embed [1, 1+N, D]"
LAYOUT_PATH_MULTITASK = ("PATH multitask {'state_dict': {'module.backbone_module.<timm ViT name>': tensor}} "
                         "with grid-only pos_embed [1, N, D] and optional cls_token_pos_embed [1, 1, D]")
LAYOUT_SOLIDER = ("SOLIDER {'teacher' | 'student': {'backbone.' or 'module.backbone.' + <mmdet Swin name>: "
                  "tensor}, 'args': argparse.Namespace, ...}")
ANY_TEACHER_LAYOUT = f"one of: {LAYOUT_PATH_TIMM}; {LAYOUT_PATH_MULTITASK}; {LAYOUT_SOLIDER}"

_PATH_MULTITASK_PREFIX = "module.backbone_module."
_SOLIDER_PREFIXES = ("module.backbone.", "backbone.")  # SOLIDER's student is DDP-wrapped, its teacher not
# mmdet's nn.Unfold orders a 2x2 patch-merging group as (c, kh, kw) -> index c*4 + kh*2 + kw; timm (and the
# original Swin) concatenates the four positions (kh, kw) = (0,0), (1,0), (0,1), (1,1), each with all C
# channels. This permutation maps one position order onto the other (it is its own inverse).
_UNFOLD_TO_CONCAT_POSITIONS = [0, 2, 1, 3]


class CheckpointError(UserError):
    """A checkpoint that cannot be used: names the file, the layout expected, and the offending keys."""

    def __init__(self, path, layout: str, problem: str, *, missing=(), unexpected=()):
        self.path, self.layout = str(path), layout
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)
        lines = [f"{path}: {problem}", f"  expected layout: {layout}"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {_key_preview(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {_key_preview(self.unexpected)}")
        super().__init__("\n".join(lines))


def _key_preview(keys: list[str], limit: int = 24) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... and {len(keys) - limit} more"


def load_checkpoint_file(path, layout: str = ANY_TEACHER_LAYOUT) -> dict:
    """Read a .pth file without running arbitrary pickled code: tensors, containers and argparse.Namespace only.
    `layout`: what the caller expects, named in the error when the file cannot be read."""
    path = Path(path)
    if problem := file_problem(path):
        raise CheckpointError(path, layout, problem)
    try:
        # SOLIDER files keep their training arguments as an argparse.Namespace; nothing else is allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on damage
        raise CheckpointError(path, layout, unreadable_reason(error)) from error
    if not isinstance(obj, dict):
        raise CheckpointError(path, layout, f"top level is a {type(obj).__name__}, not a dict")
    return obj


def unreadable_reason(error: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, as the end of a sentence that starts with its path.

    The safe loader raises UnpicklingError for pickled objects it does not allow (a class, or a function
    such as os.system: what a malicious file holds) before creating any of them; the file was not loaded
    and nothing in it ran. torch's own text ends in advice to load with weights_only=False, i.e. to run
    whatever the file holds: it is never passed on."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and (found := re.search(r"GLOBAL (\S+)", text)):
        return (f"holds objects that are not allowed in a checkpoint (the global {found.group(1)}); it was NOT "
                f"loaded and nothing in it ran: only tensors, plain containers and argparse.Namespace are read. "
                f"Use a file from a trusted source, saved as tensors only, e.g. "
                f"torch.save({{'model': state_dict}}, path)")
    if isinstance(error, pickle.UnpicklingError):  # torch's first line would be the weights_only=False advice
        found = re.search(r"Unsupported operand (\S+)", text)
        detail = f"pickle instruction {found.group(1)} refused" if found else "refused by the safe loader"
    else:
        detail = f"{type(error).__name__}: {text.strip().splitlines()[0][:200] if text.strip() else ''}"
    return (f"not a readable PyTorch checkpoint (a truncated or damaged copy, a plain pickle, or another file "
            f"type; copy or download it again), it was NOT loaded: {detail}")


def _top_keys(ckpt: dict) -> str:
    return ", ".join(repr(k) for k in list(ckpt)[:12]) or "(empty)"


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


# ----------------------------------------------------------------------------------------------- PATH (ViT)

def path_to_timm(ckpt: dict, path) -> tuple[dict, str]:
    """Either PATH layout -> (timm VisionTransformer state dict with pos_embed [1, 1+N, D], layout name)."""
    if _is_state_dict(ckpt.get("model")):
        return dict(ckpt["model"]), LAYOUT_PATH_TIMM
    if _is_state_dict(ckpt.get("state_dict")):
        raw = ckpt["state_dict"]
        backbone = {k[len(_PATH_MULTITASK_PREFIX):]: v for k, v in raw.items() if k.startswith(_PATH_MULTITASK_PREFIX)}
        if not backbone:
            raise CheckpointError(path, LAYOUT_PATH_MULTITASK,
                                  f"'state_dict' has no key starting with {_PATH_MULTITASK_PREFIX!r}",
                                  unexpected=list(raw)[:50])
        return _join_cls_position(backbone, path), LAYOUT_PATH_MULTITASK
    raise CheckpointError(path, f"{LAYOUT_PATH_TIMM}; or {LAYOUT_PATH_MULTITASK}",
                          f"no 'model' or 'state_dict' dict of tensors; top-level keys: {_top_keys(ckpt)}")


def _join_cls_position(backbone: dict, path) -> dict:
    """Multitask PATH keeps the CLS position apart: rebuild timm's [1, 1+N, D] embedding."""
    if "pos_embed" not in backbone:
        raise CheckpointError(path, LAYOUT_PATH_MULTITASK, "no pos_embed under the backbone prefix",
                              missing=[_PATH_MULTITASK_PREFIX + "pos_embed"])
    grid = backbone.pop("pos_embed")
    cls_pos = backbone.pop("cls_token_pos_embed", None)
    if cls_pos is None:
        if _square_side(grid.shape[1] - 1) and not _square_side(grid.shape[1]):
            backbone["pos_embed"] = grid  # already timm-shaped (CLS position included)
            return backbone
        cls_pos = grid.new_zeros(1, 1, grid.shape[-1])
    backbone["pos_embed"] = torch.cat([cls_pos.reshape(1, 1, -1).to(grid.dtype), grid], dim=1)
    return backbone


def _square_side(n: int) -> int:
    side = math.isqrt(max(n, 0))
    return side if side > 0 and side * side == n else 0


def pos_embed_grid(state_dict: dict, path, layout: str) -> int:
    """Side of the square position grid stored in a timm-named ViT state dict."""
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is None or pos_embed.dim() != 3:
        raise CheckpointError(path, layout, "pos_embed missing or not [1, 1+N, D]", missing=["pos_embed"])
    side = _square_side(pos_embed.shape[1] - 1)
    if not side:
        raise CheckpointError(path, layout, f"pos_embed has {pos_embed.shape[1]} tokens: not 1 CLS + a square grid")
    return side


def timm_to_path_release(state_dict: dict) -> dict:
    """timm ViT state dict -> the raw PATH multitask layout (grid-only pos_embed + cls_token_pos_embed)."""
    released = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            released[_PATH_MULTITASK_PREFIX + "cls_token_pos_embed"] = value[:, :1].clone()
            value = value[:, 1:]
        released[_PATH_MULTITASK_PREFIX + key] = value.clone()
    return {"state_dict": released}


# -------------------------------------------------------------------------------------------- SOLIDER (Swin)

_SOLIDER_BLOCK_MAP = [  # (mmdet name inside stages.i.blocks.j., timm name inside layers.i.blocks.j.)
    ("norm1.", "norm1."), ("norm2.", "norm2."),
    ("attn.w_msa.qkv.", "attn.qkv."), ("attn.w_msa.proj.", "attn.proj."),
    ("attn.w_msa.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("ffn.layers.0.0.", "mlp.fc1."), ("ffn.layers.1.", "mlp.fc2."),
]


def _unfold_to_concat(tensor: torch.Tensor) -> torch.Tensor:
    """mmdet unfold channel order (c, position) -> timm's (position, c) on the last axis of size 4C."""
    c = tensor.shape[-1] // 4
    grouped = tensor.reshape(*tensor.shape[:-1], c, 4)[..., _UNFOLD_TO_CONCAT_POSITIONS]
    return grouped.transpose(-1, -2).reshape(tensor.shape)


def _concat_to_unfold(tensor: torch.Tensor) -> torch.Tensor:
    c = tensor.shape[-1] // 4
    grouped = tensor.reshape(*tensor.shape[:-1], 4, c)[..., _UNFOLD_TO_CONCAT_POSITIONS, :]
    return grouped.transpose(-1, -2).reshape(tensor.shape)


def solider_backbone(ckpt: dict, path, *, weights: str = "teacher") -> dict:
    """The mmdet-named backbone tensors of one SOLIDER container (prefix removed)."""
    if weights not in ("teacher", "student"):
        raise ValueError(f"solider_weights must be 'teacher' or 'student', got {weights!r}")
    container = ckpt.get(weights)
    if not _is_state_dict(container):
        raise CheckpointError(path, LAYOUT_SOLIDER,
                              f"no {weights!r} dict of tensors; top-level keys: {_top_keys(ckpt)}")
    for prefix in _SOLIDER_PREFIXES:
        backbone = {k[len(prefix):]: v for k, v in container.items() if k.startswith(prefix)}
        if backbone:
            return backbone
    raise CheckpointError(path, LAYOUT_SOLIDER, f"{weights!r} has no key starting with "
                          f"{' or '.join(map(repr, _SOLIDER_PREFIXES))}", unexpected=list(container)[:50])


def solider_to_timm(backbone: dict, path, *, semantic_weight: float = 0.0) -> dict:
    """mmdet Swin names -> timm SwinTransformer names, semantic weight s folded into the downsamples.

    SOLIDER modulates x after stage i's downsample by softplus(W_w [s, 1-s] + b_w) and adds W_b [s, 1-s] + b_b.
    For a fixed s that is a per-channel affine of the reduction's output, so it becomes the reduction's row
    scale and bias (timm's reduction has no bias: the teacher adds one). After the last stage (no downsample)
    SOLIDER modulates only the tensor it does not return, so those layers do not change the output.
    Keys that are unknown stay in the result under their own name, for the caller to report as unexpected.
    """
    if not 0.0 <= semantic_weight <= 1.0:
        raise ValueError(f"semantic_weight must lie in [0, 1] (SOLIDER's s), got {semantic_weight}")
    stage_ids = {int(m.group(1)) for k in backbone if (m := re.match(r"stages\.(\d+)\.", k))}
    last_stage = max(stage_ids, default=0)
    converted, semantic = {}, {}
    for key, value in backbone.items():
        if m := re.fullmatch(r"semantic_embed_([wb])\.(\d+)\.(weight|bias)", key):
            if int(m.group(2)) != last_stage:
                semantic[key] = value
            continue
        if _is_unused_solider_key(key, last_stage):
            continue
        converted[_solider_name_to_timm(key, last_stage)] = _reorder_merging(key, value)
    for stage in sorted(stage_ids - {last_stage}):
        _fold_semantic_affine(converted, semantic, stage, semantic_weight, path)
    converted.update(semantic)  # left-overs (not consumed by a downsample) are reported as unexpected
    return converted


def _is_unused_solider_key(key: str, last_stage: int) -> bool:
    """Index buffers (timm recomputes them), norms of intermediate outputs (for dense heads), pretext heads."""
    if key.endswith("relative_position_index") or key.startswith("head."):
        return True
    m = re.fullmatch(r"norm(\d+)\.(weight|bias)", key)
    return m is not None and int(m.group(1)) != last_stage


def _solider_name_to_timm(key: str, last_stage: int) -> str:
    if key.startswith("patch_embed.projection."):
        return "patch_embed.proj." + key[len("patch_embed.projection."):]
    if key.startswith(f"norm{last_stage}."):
        return "norm." + key[len(f"norm{last_stage}."):]
    if m := re.match(r"stages\.(\d+)\.downsample\.(.*)", key):
        return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key):
        for mmdet_name, timm_name in _SOLIDER_BLOCK_MAP:
            if m.group(3).startswith(mmdet_name):
                return f"layers.{m.group(1)}.blocks.{m.group(2)}.{timm_name}{m.group(3)[len(mmdet_name):]}"
    return key


def _reorder_merging(key: str, value: torch.Tensor) -> torch.Tensor:
    if re.fullmatch(r"stages\.\d+\.downsample\.(norm\.(weight|bias)|reduction\.weight)", key):
        return _unfold_to_concat(value)
    return value


def _fold_semantic_affine(converted: dict, semantic: dict, stage: int, s: float, path) -> None:
    names = [f"semantic_embed_{wb}.{stage}.{p}" for wb in "wb" for p in ("weight", "bias")]
    absent = [n for n in names if n not in semantic]
    if absent:
        raise CheckpointError(path, LAYOUT_SOLIDER, f"semantic-weight layers of stage {stage} are incomplete",
                              missing=absent)
    reduction_key = f"layers.{stage + 1}.downsample.reduction.weight"
    if reduction_key not in converted:
        return  # no downsample to fold into: the caller reports its keys as missing and these as unexpected
    reduction = converted[reduction_key]
    width = reduction.shape[0]
    wrong = [f"{n} {list(semantic[n].shape)}" for n, shape in zip(names, [(width, 2), (width,)] * 2)
             if tuple(semantic[n].shape) != shape]
    if wrong:
        raise CheckpointError(path, LAYOUT_SOLIDER, f"semantic-weight layers of stage {stage} do not fit its "
                              f"downsample to {width} channels: " + ", ".join(wrong))
    w_weight, w_bias, b_weight, b_bias = (semantic.pop(n).double() for n in names)
    condition = torch.tensor([s, 1.0 - s], dtype=torch.float64)
    scale = F.softplus(w_weight @ condition + w_bias)
    shift = b_weight @ condition + b_bias
    converted[reduction_key] = (reduction.double() * scale[:, None]).to(reduction.dtype)
    converted[f"layers.{stage + 1}.downsample.reduction.bias"] = shift.to(reduction.dtype)


def timm_to_solider_release(state_dict: dict, *, relative_position_index: dict, args=None) -> dict:
    """timm Swin state dict (reduction with folded bias) -> SOLIDER's mmdet layout, in both containers.

    The folded affine is written back as a semantic-weight layer that ignores s (zero weights, softplus of its
    bias = 1, bias layer = the folded bias), so the file reloads to the same network for every s. The
    intermediate norms norm0..norm{L-2} that SOLIDER saves (unused by the teacher) are written as identity.
    `relative_position_index` maps a timm block prefix 'layers.i.blocks.j.' to its index buffer.
    """
    stages = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
    inverse_block_map = [(t, m) for m, t in _SOLIDER_BLOCK_MAP]
    backbone = {}
    for key, value in state_dict.items():
        value = value.detach().clone()
        if key.startswith("patch_embed.proj."):
            backbone["patch_embed.projection." + key[len("patch_embed.proj."):]] = value
        elif key.startswith("norm."):
            backbone[f"norm{stages - 1}." + key[len("norm."):]] = value
        elif m := re.fullmatch(r"layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)", key):
            backbone[f"stages.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = _concat_to_unfold(value)
        elif m := re.fullmatch(r"layers\.(\d+)\.downsample\.reduction\.bias", key):
            stage = int(m.group(1)) - 1
            backbone.update(_identity_semantic_layers(stage, shift=value))
        elif m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)", key):
            for timm_name, mmdet_name in inverse_block_map:
                if m.group(3).startswith(timm_name):
                    backbone[f"stages.{m.group(1)}.blocks.{m.group(2)}.{mmdet_name}"
                             f"{m.group(3)[len(timm_name):]}"] = value
        else:
            backbone[key] = value
    for block_prefix, index in relative_position_index.items():
        i, j = block_prefix.split(".")[1], block_prefix.split(".")[3]
        backbone[f"stages.{i}.blocks.{j}.attn.w_msa.relative_position_index"] = index.clone()
    last_width = state_dict["norm.weight"].shape[0]
    backbone.update(_identity_semantic_layers(stages - 1, shift=torch.zeros(last_width)))
    for stage in range(stages - 1):
        width = state_dict[f"layers.{stage}.blocks.0.norm1.weight"].shape[0]
        backbone[f"norm{stage}.weight"], backbone[f"norm{stage}.bias"] = torch.ones(width), torch.zeros(width)
    return {
        "teacher": {"backbone." + k: v for k, v in backbone.items()},
        "student": {"module.backbone." + k: v.clone() for k, v in backbone.items()},  # DDP-wrapped in SOLIDER
        "epoch": 0,
        "args": args if args is not None else argparse.Namespace(arch="swin", semantic_weight=0.0),
    }


def _identity_semantic_layers(stage: int, *, shift: torch.Tensor) -> dict:
    width = shift.shape[0]
    softplus_inverse_of_one = math.log(math.e - 1.0)
    return {
        f"semantic_embed_w.{stage}.weight": torch.zeros(width, 2),
        f"semantic_embed_w.{stage}.bias": torch.full((width,), softplus_inverse_of_one),
        f"semantic_embed_b.{stage}.weight": torch.zeros(width, 2),
        f"semantic_embed_b.{stage}.bias": shift.detach().clone().float(),
    }


def load_exact(model: torch.nn.Module, state_dict: dict, path, layout: str, name: str, *, detail: str = "") -> None:
    """load_state_dict(strict=True), but a mismatch raises a CheckpointError naming the file, the layout and
    every missing, unexpected and wrongly shaped key (`name` is what the file was expected to hold); so do
    NaN or infinite values."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} (file {list(state_dict[k].shape)}, {name} needs {list(expected[k].shape)})"
                   for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problem = f"does not match {name}{detail}"
        if wrong_shape:
            problem += f"; wrong shapes ({len(wrong_shape)}): " + ", ".join(wrong_shape[:8])
        raise CheckpointError(path, layout, problem, missing=missing, unexpected=unexpected)
    not_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:  # a damaged or diverged file: every target or feature computed from it would be NaN / inf
        raise CheckpointError(path, layout, f"holds NaN or infinite values in {len(not_finite)} tensor(s): "
                              f"{_key_preview(not_finite, 8)}; use an intact copy of the weights")
    model.load_state_dict(state_dict, strict=True)
