"""Student backbones (spec section 2) and their export format.

A student is a timm model (`Student.backbone`, timm state-dict names) plus the two architecture details
timm's constructors cannot express, applied after `timm.create_model` by `create_backbone`:

- ViT: the last block has the teacher's head count (12 for PATH-B, 16 for PATH-L) while the others keep
  the student's own (ViT-Ti 6, not timm's 3). The width is unchanged, so keys and shapes are timm's.
- Swin: grid-adaptive shifted windows (`_GridWindowSwinBlock`, see `dpal.swin`), so 128x96 local crops (final
  grid 4x3) and 256x128 views (8x4) get windows clipped to the map instead of windows mostly made of padding.

An export (`export_contents`; `formats.exports.export_student` writes it) is a folder in timm's local-dir layout:
model.safetensors (the timm state dict) and config.json naming the student's registered timm architecture
(`dpal_vit_ti`, ...; see `dpal.timm_models`) with this project's config, which records the weights' SHA-256.
`load_student` checks that checksum and rebuilds the backbone through the same `create_backbone`, so its
forward equals the trained one's.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dpal.checkpoints import CheckpointError, load_exact
from dpal.config import IMAGENET_MEAN, IMAGENET_STD, Recipe, StudentSpec, TeacherSpec
from dpal.resize import bicubic_resize
from dpal.errors import file_problem
from dpal.recipes import STUDENTS, timm_architecture
from dpal.swin import PaddedWindowBlock, use_padded_windows
from dpal.timm_backbones import ACCEPTED, TIMM_PREFIX, BackboneError, describe, is_timm_name, load_backbone_weights

EXPORT_FORMAT = "dpal-student"
EXPORT_FORMAT_VERSION = 2
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"  # timm's local-dir layout
TRAIN_SIZE = (256, 128)  # (H, W) of the global view: the resolution the position grid is learned at
VIT_PATCH = 16
SWIN_STRIDE = 32  # patch 4, three 2x merges
_METADATA_KEY = "dpal_student_config"
_EXPORT_LAYOUT = (f"{EXPORT_FORMAT} v{EXPORT_FORMAT_VERSION}: a folder with {WEIGHTS_FILE} (timm state dict) and "
                  f"{CONFIG_FILE} (timm local-dir config; architecture and weights checksum under \"dpal\")")


class StudentTokens(NamedTuple):
    cls: torch.Tensor  # [B, 1, D_s]: ViT CLS token after the final norm; Swin: mean of final tokens
    patches: torch.Tensor  # [B, N, D_s]: patch tokens after the final norm (Swin: final stage, stride 32)
    grid: tuple[int, int]  # (h, w) of the patch tokens


# --------------------------------------------------------------------------------- Swin windows

class _GridWindowSwinBlock(PaddedWindowBlock):
    """A timm Swin block's layers with windows that adapt to the actual feature grid (same parameters and names).

    timm fixes window and shift from the construction size and rolls before padding, so on grids that are
    not window multiples (all of 256x128's: 64x32 ... 8x4) the cyclic shift wraps rows across the border
    without masking them, and padded zeros join real tokens' attention. Here, per forward:
    - along an axis that fits into one window (8x4 -> width 4; 4x3 -> both) there is a single window and
      no shift, as in the original Swin for small maps (shifting would only wrap the map onto itself);
    - otherwise the map is padded to window multiples, then shifted (Swin-det order), and the mask keeps
      the shifted regions apart as usual;
    - padded positions are masked out as keys, so every real token attends to real tokens only.
    A window clipped to an a x b grid is exactly a 7x7 window whose other positions are masked, so the
    7x7 relative-position tables (timm's shapes) serve every grid.
    """

    def _shift_and_mask_grid(self, height: int, width: int, padded_h: int, padded_w: int):
        win_h, win_w = self.window_size
        shift = (self.shift_size[0] if height > win_h else 0, self.shift_size[1] if width > win_w else 0)
        return shift, (height, width)  # the real grid: padded positions get their own mask label


class _MatrixResizeViT(VisionTransformer):
    """timm's ViT whose position-grid resize runs as two GEMMs (`dpal.resize`), not F.interpolate.

    Same parameters and numerics (antialiased bicubic, float32) as timm's dynamic_img_size path, but
    with a deterministic backward, so `--deterministic` training works on CUDA. Written for the students'
    layout, checked in `create_backbone`: one class token that has a position embedding, no registers.
    """

    # Overrides timm's private `_pos_embed`: timm offers no public hook for how the position grid is resized.
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        prefix, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (height, width) != tuple(self.patch_embed.grid_size):
            grid = bicubic_resize(grid.view(1, *self.patch_embed.grid_size, channels), (height, width),
                                  antialias=True)
        pos_embed = torch.cat([prefix, grid.reshape(1, height * width, channels)], dim=1)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x.view(batch, -1, channels)], dim=1)
        return self.pos_drop(x + pos_embed)


# --------------------------------------------------------------------------------- building

# The timm arguments an export may carry, per architecture (`student_config` writes exactly these). A config
# is data from a file: anything else (e.g. timm's `checkpoint_path`, which loads an arbitrary file) is refused.
TIMM_KWARGS = {"vit": {"img_size", "num_heads", "drop_path_rate", "dynamic_img_size", "num_classes"},
               "swin": {"img_size", "drop_path_rate", "strict_img_size", "always_partition", "num_classes"}}


def student_config(recipe: Recipe) -> dict:
    """The architecture of a recipe's student as plain JSON-able data (what an export carries)."""
    return architecture_config(recipe.student, last_block_heads=recipe.student_last_heads)


def architecture_config(spec: StudentSpec, *, last_block_heads: int | None = None, **overrides) -> dict:
    """A student's architecture as plain data: its timm arguments (`overrides` replace those in TIMM_KWARGS of
    its kind) and, for a ViT, the last block's head count (None: the same as the other blocks)."""
    if spec.arch == "vit":
        kwargs = {"img_size": list(TRAIN_SIZE), "num_heads": spec.num_heads, "drop_path_rate": spec.drop_path,
                  "dynamic_img_size": True, "num_classes": 0}
        extra_arch = {"last_block_heads": last_block_heads}
    elif spec.arch == "swin":
        kwargs = {"img_size": list(TRAIN_SIZE), "drop_path_rate": spec.drop_path, "strict_img_size": False,
                  "always_partition": True, "num_classes": 0}
        extra_arch = {"window_attention": "grid-adaptive"}
    else:
        raise ValueError(f"student {spec.name}: unknown architecture {spec.arch!r} (expected 'vit' or 'swin')")
    unknown = sorted(set(overrides) - set(kwargs))
    if unknown:
        raise ValueError(f"student {spec.name}: unknown argument(s) {', '.join(unknown)}; accepted: "
                         f"{', '.join(sorted(kwargs))}" + (", last_block_heads" if spec.arch == "vit" else ""))
    kwargs.update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})
    return {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "student": spec.name,
            "arch": spec.arch, "width": spec.width, "timm_name": spec.timm_name, "timm_kwargs": kwargs,
            **extra_arch, "timm_version": timm.__version__}


def create_backbone(config: dict) -> nn.Module:
    """timm model of a student config (random timm init); the one constructor behind build and load."""
    kwargs = dict(config["timm_kwargs"])
    kwargs["img_size"] = tuple(kwargs["img_size"])
    model = timm.create_model(config["timm_name"], pretrained=False, **kwargs)
    if model.num_features != config["width"]:
        raise ValueError(f"{config['timm_name']} gives width {model.num_features}, config says {config['width']}")
    if config["arch"] == "vit":
        if model.cls_token is None or model.reg_token is not None or model.no_embed_class:
            raise ValueError(f"{config['timm_name']}: the student ViT needs one class token inside the position "
                             "embedding and no register tokens")
        # Same parameters, position grid resized by GEMMs. A class swap, not a build through the subclass: the
        # config names a timm variant, whose architecture only timm's entry point knows, and it builds the base class.
        model.__class__ = _MatrixResizeViT
        last = model.blocks[-1]
        heads = config["last_block_heads"]
        if heads is not None and heads != last.attn.num_heads:
            # timm has one head count for all blocks; the last block's attention is rebuilt with the
            # teacher's count. Same qkv / proj shapes, so the state-dict keys and shapes stay timm's.
            last.attn = Attention(config["width"], num_heads=heads, qkv_bias=last.attn.qkv.bias is not None)
    elif config["arch"] == "swin":
        if config.get("window_attention") != "grid-adaptive":
            raise ValueError(f"unknown Swin window_attention {config.get('window_attention')!r}")
        use_padded_windows(model, _GridWindowSwinBlock)  # same parameters, grid-adaptive windows
    return model


def _init_vit_original(model: nn.Module) -> None:
    """The original DPAL's init (spec 2): xavier-uniform linears (and patch projection, flattened), zero
    Linear biases, unit LayerNorms, CLS N(0, 0.02), position embedding U[0, 1) (the original's `torch.rand`,
    never re-initialised); the patch projection's bias keeps PyTorch's default, as there."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    proj = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
    nn.init.normal_(model.cls_token, std=0.02)
    nn.init.uniform_(model.pos_embed, 0.0, 1.0)


class Student(nn.Module):
    """A student backbone (timm model in `.backbone`) giving `StudentTokens` for any view size."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.arch = config["arch"]
        self.token_stride = VIT_PATCH if self.arch == "vit" else SWIN_STRIDE
        self.backbone = create_backbone(config)

    def forward(self, images: torch.Tensor) -> StudentTokens:
        height, width = images.shape[-2:]
        if images.dim() != 4 or height % self.token_stride or width % self.token_stride:
            raise ValueError(f"student {self.config['student']} needs images [B, 3, H, W] with H and W multiples "
                             f"of {self.token_stride}, got {tuple(images.shape)}")
        features = self.backbone.forward_features(images)
        grid = (height // self.token_stride, width // self.token_stride)
        if self.arch == "vit":
            # The learned 16x8 position grid is resized 2-D bicubic to this view's grid (_MatrixResizeViT).
            return StudentTokens(features[:, :1], features[:, 1:], grid)
        patches = features.flatten(1, 2)
        return StudentTokens(patches.mean(dim=1, keepdim=True), patches, grid)

    def local_tokens(self, out: StudentTokens, teacher: TeacherSpec) -> torch.Tensor:
        """Patch tokens on the teacher's token grid for the same view: [B, N_t, D_s].

        Swin (stride 32) under a ViT teacher (stride 16): final tokens upsampled 2x bicubic."""
        if teacher.token_stride == self.token_stride:
            return out.patches
        scale = self.token_stride / teacher.token_stride
        if scale != 2:
            raise ValueError(f"student stride {self.token_stride} vs teacher {teacher.name} stride "
                             f"{teacher.token_stride}: only equal strides or a 2x upsample are defined")
        grid_h, grid_w = out.grid
        tokens = bicubic_resize(out.patches.unflatten(1, (grid_h, grid_w)), (2 * grid_h, 2 * grid_w), antialias=False)
        return tokens.flatten(1, 2)

    def relation_tokens(self, out: StudentTokens, teacher: TeacherSpec) -> torch.Tensor:
        """Crowd-view tokens matching the teacher's relation tokens: [B, N_c, D_s].

        ViT teacher: [CLS slot, tokens on its grid] (Swin student: [mean, upsampled 16x16] = 257);
        Swin teacher: the final tokens only (8x8, no CLS)."""
        tokens = self.local_tokens(out, teacher)
        return torch.cat([out.cls, tokens], dim=1) if teacher.has_cls else tokens


def student_spec(name: str) -> StudentSpec:
    """A student name of dpal.recipes.STUDENTS (where `dpal.register_student` adds), or `timm:NAME` for a timm
    ViT (patch 16) or Swin (stride 32), described by the model timm builds: its width and heads, no
    down-projection before the decoder, the shipped students' drop-path rate of its kind."""
    if not is_timm_name(name):
        try:
            return STUDENTS[name]
        except KeyError:
            raise BackboneError(f"unknown student {name!r}; accepted: {', '.join(STUDENTS)}, or {ACCEPTED}") from None
    description = describe(name)[1]
    if description["token_stride"] != (VIT_PATCH if description["arch"] == "vit" else SWIN_STRIDE):
        raise BackboneError(f"student {name}: token stride {description['token_stride']}; accepted: {ACCEPTED} "
                            f"with ViT patch {VIT_PATCH} or Swin stride {SWIN_STRIDE}")
    drop_path = next(s.drop_path for s in STUDENTS.values() if s.arch == description["arch"])
    return StudentSpec(name, description["arch"], description["timm_name"], width=description["width"],
                       num_heads=description["num_heads"], drop_path=drop_path)


def pair_problem(recipe: Recipe) -> str | None:
    """Why the recipe's student cannot learn from its teacher (None when it can): the student's tokens must lie on
    the teacher's grid or on one twice as coarse (`Student.local_tokens`), and a ViT student's last block takes
    the teacher's head count, which must divide the student's width."""
    teacher, student = recipe.teacher, recipe.student
    stride = VIT_PATCH if student.arch == "vit" else SWIN_STRIDE
    if stride not in (teacher.token_stride, 2 * teacher.token_stride):
        return (f"student {student.name} (token stride {stride}) cannot follow teacher {teacher.name} (token stride "
                f"{teacher.token_stride}): the student's stride must equal the teacher's or be twice it")
    if student.arch == "vit" and student.width % teacher.num_heads:
        return (f"student {student.name} (width {student.width}) cannot take teacher {teacher.name}'s "
                f"{teacher.num_heads} heads in its last block: choose a student whose width they divide")
    return None


def load_initial_weights(student: Student, path) -> None:
    """Start `student` from the timm state dict in `path` (safetensors or torch) instead of its random init;
    every key must fit (the classifier head of a timm checkpoint is left out)."""
    load_backbone_weights(student.backbone, path, f"student {student.config['student']}")


def build_student(recipe: Recipe) -> Student:
    """The recipe's student, randomly initialised (ViT: the original's init; Swin: timm's init), in train mode."""
    student = Student(student_config(recipe))
    if student.arch == "vit":
        _init_vit_original(student.backbone)
    return student


# --------------------------------------------------------------------------------- export / load

def export_paths(path) -> tuple[Path, Path]:
    """(FOLDER/model.safetensors, FOLDER/config.json) of an export named by its folder or either file."""
    path = Path(path)
    if path.name in (WEIGHTS_FILE, CONFIG_FILE) and not path.is_dir():
        path = path.parent
    return path / WEIGHTS_FILE, path / CONFIG_FILE


def weights_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's contents (names, dtypes, shapes, bytes in name order), independent of how the
    safetensors file lays them out and of its metadata (which carries this very checksum)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_contents(student: Student, *, extra: dict | None = None) -> tuple[bytes, bytes]:
    """The two files of an export folder as bytes (dpal writes no files; `formats.exports` does):
    model.safetensors (the backbone's timm state dict) and config.json, timm's local-dir layout naming the
    registered architecture (`dpal.recipes.timm_architecture`), its arguments and preprocessing, with this
    project's config under "dpal" (architecture, `extra`, and the weights' checksum). That config is also stored
    in the safetensors metadata, so the weights file alone is self-describing. Works for the EMA copy (a Student, or a wrapper of
    one with `.module`) as well."""
    student = getattr(student, "module", student)  # DistributedDataParallel / AveragedModel wrappers
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in student.backbone.state_dict().items()}
    config = {**student.config, "weights_sha256": weights_checksum(tensors)}
    if extra is not None:
        config["extra"] = extra
    embedded = json.dumps(config, sort_keys=True)
    timm_json = json.dumps(timm_config(config), indent=2) + "\n"
    return save(tensors, metadata={_METADATA_KEY: embedded}), timm_json.encode()


def timm_config(config: dict) -> dict:
    """timm's config.json for a dpal student config (what `timm.create_model("local-dir:FOLDER")` reads)."""
    model_args = {k: v for k, v in config["timm_kwargs"].items() if k != "num_classes"}
    if config["arch"] == "vit":
        model_args["last_block_heads"] = config["last_block_heads"]
    height, width = config["timm_kwargs"]["img_size"]
    return {"architecture": timm_architecture(config["student"]), "num_classes": 0, "num_features": config["width"],
            "model_args": model_args,
            "pretrained_cfg": {"input_size": [3, height, width], "fixed_input_size": False,
                               "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                               "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "num_classes": 0},
            "dpal": config}


class _Features(nn.Module):
    """forward_features of a backbone as a module's forward (what an export's program computes)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)


def feature_program(student: Student) -> torch.export.ExportedProgram:
    """A `torch.export` program of the student's timm `forward_features` on float32 images [B, 3, 256, 128] (the
    training size; B free), on the CPU and in eval mode, loadable with torch alone. Built from a copy, so the
    student itself is left as it is."""
    student = getattr(student, "module", student)
    backbone = copy.deepcopy(student.backbone).to("cpu", torch.float32).eval()
    example = torch.zeros(2, 3, *TRAIN_SIZE)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        return torch.export.export(_Features(backbone), (example,), dynamic_shapes=({0: batch},))


def _refuse(path, problem: str):
    raise CheckpointError(path, _EXPORT_LAYOUT, problem)


def read_student_config(path) -> dict:
    """The dpal config of an export folder (config.json's "dpal" entry, which must equal the copy in the weights'
    metadata; the metadata alone if config.json is absent), checked: format, architecture, arguments."""
    weights_path, config_path = export_paths(path)
    path = Path(path)
    version_1 = path.suffix in (".json", ".safetensors") and path.name not in (WEIGHTS_FILE, CONFIG_FILE)
    if not weights_path.exists() and (version_1 or Path(f"{path}.safetensors").is_file()):
        _refuse(path, "an export of format version 1 (NAME.safetensors + NAME.json); make a current export from "
                      "the run's checkpoint with `train_student export RUN_DIR`")
    if problem := file_problem(weights_path):
        _refuse(weights_path, problem)
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            embedded = (handle.metadata() or {}).get(_METADATA_KEY)
    except Exception as error:
        _refuse(weights_path, f"not a readable safetensors file: {error}")
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text()).get("dpal")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            _refuse(config_path, f"config is not a JSON object: {error}")
        if not isinstance(config, dict):
            _refuse(config_path, 'no "dpal" entry: not an export of this project')
        if embedded is not None and json.loads(embedded) != config:
            _refuse(config_path, f"config differs from the one stored in {weights_path.name}: the two files come "
                                 f"from different exports; export again or remove the stale config.json")
    elif embedded is not None:
        config = json.loads(embedded)
    else:
        _refuse(config_path, "no config.json beside the weights and none embedded")
    if config.get("format") != EXPORT_FORMAT or config.get("format_version") != EXPORT_FORMAT_VERSION:
        _refuse(config_path, f"format {config.get('format')!r} version {config.get('format_version')!r} is not "
                             f"{EXPORT_FORMAT!r} version {EXPORT_FORMAT_VERSION}; make a current export from the "
                             f"run's checkpoint with `train_student export RUN_DIR`")
    known_names = {student.timm_name for student in STUDENTS.values()}
    if is_timm_name(config.get("student")):  # a student named after a timm model is built from that model
        known_names.add(config["student"][len(TIMM_PREFIX):])
    if config.get("timm_name") not in known_names or config.get("arch") not in TIMM_KWARGS:
        _refuse(config_path, f"timm_name {config.get('timm_name')!r} / arch {config.get('arch')!r} is not a "
                             f"student architecture ({', '.join(sorted(known_names))})")
    kwargs = config.get("timm_kwargs")
    unknown = sorted(set(kwargs) - TIMM_KWARGS[config["arch"]]) if isinstance(kwargs, dict) else ["(not a dict)"]
    if unknown:
        _refuse(config_path, f"timm_kwargs holds arguments an export never carries: {', '.join(unknown)}; refused "
                             f"(a config must not make timm load other files)")
    if not isinstance(config.get("weights_sha256"), str):
        _refuse(config_path, "no weights_sha256: the weights cannot be checked; export again")
    return config


def load_export_weights(path, config: dict) -> dict[str, torch.Tensor]:
    """The state dict of an export, refused unless its checksum is the one its config records."""
    weights_path, _ = export_paths(path)
    with safe_open(str(weights_path), framework="pt") as handle:
        state_dict = {k: handle.get_tensor(k) for k in handle.keys()}
    if weights_checksum(state_dict) != config["weights_sha256"]:
        _refuse(weights_path, "the weights do not match the checksum their export recorded (a damaged or replaced "
                              "file); copy the export again or make a new one with `train_student export RUN_DIR`")
    return state_dict


def load_student(path, *, num_classes: int = 0, drop_path_rate: float | None = None) -> nn.Module:
    """Rebuild an exported student as a timm model (eval mode) whose features equal the trained backbone's.

    `path` is an export folder (or its model.safetensors / config.json); `timm.create_model("local-dir:FOLDER")`
    comes here once `dpal` is imported. `num_classes` > 0 adds a fresh classifier head (the features are
    unchanged). The weights must match their recorded checksum and every key and shape the architecture,
    otherwise a CheckpointError names the problem."""
    weights_path, _ = export_paths(path)
    config = read_student_config(path)
    state_dict = load_export_weights(path, config)
    config = {**config, "timm_kwargs": {**config["timm_kwargs"], "num_classes": num_classes}}
    if drop_path_rate is not None:
        config["timm_kwargs"]["drop_path_rate"] = drop_path_rate
    if num_classes:  # the head is new: timm's init for it, the file for everything else
        model = create_backbone(config)
        state_dict = {**{k: v for k, v in model.state_dict().items() if k.startswith("head.")}, **state_dict}
    else:
        with torch.device("meta"):  # every parameter comes from the file: skip the random init
            model = create_backbone(config)
        model = materialize(model)
    load_exact(model, state_dict, weights_path, _EXPORT_LAYOUT, f"student {config['student']}")
    model.pretrained_cfg = timm_config(config)["pretrained_cfg"]  # timm.data.resolve_data_config reads it
    return model.eval()


def materialize(module: nn.Module) -> nn.Module:
    """A module built on the meta device -> CPU storage left uninitialised (for a load that sets every
    parameter), with the non-persistent index buffers that timm recomputes rather than saves."""
    module = module.to_empty(device="cpu")
    for submodule in module.modules():
        if hasattr(submodule, "init_non_persistent_buffers"):
            submodule.init_non_persistent_buffers()
    return module


__all__ = ["CONFIG_FILE", "EXPORT_FORMAT_VERSION", "WEIGHTS_FILE", "Student", "StudentTokens", "build_student",
           "architecture_config", "create_backbone", "export_contents", "export_paths", "feature_program",
           "load_export_weights", "load_student", "materialize",
           "pair_problem", "read_student_config", "student_config", "student_spec", "load_initial_weights", "timm_config",
           "weights_checksum"]
