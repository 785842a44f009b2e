"""Configuration dataclasses: one frozen record per concern, every default from docs/method.md.

Recipes (``dpal.recipes``) combine them; CLIs only override individual fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TeacherSpec:
    """A frozen teacher backbone (spec section 1)."""

    name: str  # 'path-b' | 'path-l' | 'solider-b'
    arch: str  # 'vit' | 'swin'
    timm_name: str
    width: int  # D_t: width of the tokens the targets are made of
    depth: int
    num_heads: int  # ViT: heads of every block; Swin: heads of the last stage
    patch_size: int
    token_stride: int  # stride of the target tokens in pixels (16 for ViT/16, 32 for Swin)
    has_cls: bool


def token_counts(spec: TeacherSpec, cfg: ViewConfig) -> tuple[tuple[int, int], int, int]:
    """(token grid of the global view, N, Nc) of a teacher for the configured view sizes."""
    grid = (cfg.global_size[0] // spec.token_stride, cfg.global_size[1] // spec.token_stride)
    crowd = (cfg.crowd_size[0] // spec.token_stride) * (cfg.crowd_size[1] // spec.token_stride)
    return grid, grid[0] * grid[1], crowd + int(spec.has_cls)


@dataclass(frozen=True)
class StudentSpec:
    """A student backbone (spec section 2)."""

    name: str  # 'vit-ti' | 'vit-s' | 'vit-b' | 'swin-t' | 'swin-s'
    arch: str  # 'vit' | 'swin'
    timm_name: str
    width: int  # D_s: width of the final tokens
    num_heads: int  # ViT: heads of blocks 0..depth-2 (the last block takes the teacher's count)
    drop_path: float
    inter_dim: int | None = None  # decoder down-projection width (ViT-B: 192)


@dataclass(frozen=True)
class DecoderSpec:
    """Dynamic pattern decoder (spec section 5)."""

    in_dim: int  # D_s, or inter_dim when the student has one
    out_dim: int  # D_o = D_t
    student_dim: int  # D_s (differs from in_dim only with inter_dim)
    align_heads: int = 16
    gate_heads: int = 12
    num_patterns: int = 3  # 0 global, 1 local, 2 relation
    mix_divisor: float = 256.0
    experts_loss_weight: float = 0.025


@dataclass(frozen=True)
class ViewConfig:
    """Random view sets (spec section 3). Sizes are (height, width); aspect ranges are w/h."""

    global_size: tuple[int, int] = (256, 128)
    global_scale: tuple[float, float] = (0.8, 1.0)
    person_aspect: tuple[float, float] = (0.4, 0.6)
    global_blur_p: float = 1.0
    local_size: tuple[int, int] = (128, 96)
    local_scale: tuple[float, float] = (0.05, 0.8)
    local_blur_p: float = 0.5
    num_local: int = 2
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    crowd_size: tuple[int, int] = (256, 256)
    background_scale: tuple[float, float] = (0.2, 1.0)
    background_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    background_blur_p: float = 0.1
    background_solarize_p: float = 0.2
    solarize_threshold: int = 128
    person_alpha: float = 0.7  # pasted person weight; the background keeps 1 - alpha
    paste_y: tuple[int, int] = (0, 126)
    first_person_x: tuple[int, int] = (0, 62)
    second_person_x_max: int = 158  # second x is drawn in [x1 + person width, this]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class OptimConfig:
    """Published optimisation recipe (spec section 7) plus the project's bf16 / EMA choices."""

    batch_per_gpu: int = 256
    num_gpus: int = 8
    accum_steps: int = 1
    base_lr: float = 2.5e-4  # lr = base_lr * global_batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: int = 200
    warmup_epochs: int = 10
    ema_momentum: tuple[float, float] = (0.996, 1.0)  # cosine over the whole run, per iteration
    moe_weight: tuple[float, float] = (0.1, 0.01)  # before / from moe_switch_epoch on
    moe_switch_epoch: int = 20
    amp_dtype: str = "bfloat16"

    def peak_lr(self, global_batch: int) -> float:
        """The linear scaling rule: base_lr at a global batch of 256."""
        return self.base_lr * global_batch / 256


@dataclass(frozen=True)
class Recipe:
    """One of the eight published teacher/student pairs (spec section 8)."""

    name: str  # '<teacher>_<student>', e.g. 'path-b_vit-ti'
    teacher: TeacherSpec
    student: StudentSpec
    decoder: DecoderSpec
    optim: OptimConfig = field(default_factory=OptimConfig)
    views: ViewConfig = field(default_factory=ViewConfig)

    @property
    def student_last_heads(self) -> int | None:
        """Head count of the student's last ViT block: the teacher's (a leftover kept for comparability)."""
        return self.teacher.num_heads if self.student.arch == "vit" else None

    def fused_calls(self, batch: int | None = None) -> "FusedCalls":
        """The decoder and relation-loss calls one `dpal.distill.distill_step_losses` makes for this recipe at
        `batch` samples per GPU (default: the recipe's): the shapes the fused kernels must compile and be
        benchmarked at."""
        batch = self.optim.batch_per_gpu if batch is None else batch
        _, tokens, crowd_tokens = token_counts(self.teacher, self.views)
        dims = (self.decoder.in_dim, self.decoder.out_dim)
        # The global view's and every local crop's CLS tokens go through the decoder as one stacked call.
        return FusedCalls(decoder=((batch * (1 + self.views.num_local), 1, *dims), (batch, tokens, *dims),
                                   (batch, crowd_tokens, *dims)),
                          relation=(batch, crowd_tokens, self.decoder.out_dim))


@dataclass(frozen=True)
class FusedCalls:
    """Shapes of one step's fused-op calls: decoder (rows B, tokens L, D, D_o) in call order (stacked CLS
    tokens, the global view's local tokens, the crowd view's relation tokens), and the relation loss's
    (B, N, D)."""

    decoder: tuple[tuple[int, int, int, int], ...]
    relation: tuple[int, int, int]
