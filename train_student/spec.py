"""A training run as its command line asked for it: frozen, built once by `python -m train_student`.

Light on purpose (no torch): the command line builds it before anything heavy is imported. `train.run_record`
turns it, with what the inputs say (the recipe's optimisation after overrides, the store's identity, the images
file's fingerprint), into RUN_DIR/run.json, which a --resume must match.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from runtime.arguments import backbone_name, recipe_name
from dpal.recipes import PAIR_SEPARATOR, RECIPES, STUDENTS, TEACHERS, TIMM_PREFIX, pair_name
from runtime.cli import ConfigError


@dataclass(frozen=True)
class TrainSpec:
    """Every field is the command-line option of the same name (`python -m train_student --help`)."""

    recipe: str  # a published recipe, or TEACHER+STUDENT (--teacher with --student)
    store: str | None  # None with --teacher-online
    images: str
    backgrounds: str
    out: str
    resume: bool
    inexact_resume: bool  # --resume may change settings that change the arithmetic (recorded in run.json)
    batch_size: int | None  # global batch; None: the recipe's per-GPU batch x ranks x accumulation steps
    accum_steps: int | None  # optimisation overrides, None: the recipe's value
    epochs: int | None
    warmup_epochs: int | None
    blr: float | None
    lr: float | None  # absolute peak lr, replacing the blr rule
    min_lr: float | None
    weight_decay: float | None
    device: str  # 'auto', 'cuda' or 'cpu'
    workers: int  # FFCV decoding threads per rank
    window_images: int
    seed: int
    reference_path: bool
    compile: bool  # torch.compile the student and the decoder
    deterministic: bool
    teacher_online: bool
    student_weights: str | None  # the student's initial weights (a timm state dict); None: the recipe's init
    teacher_weights: str | None
    teacher_options: dict  # validated `dpal.teachers.load_teacher` options
    calibration_images: int
    max_steps: int | None
    val_store: str | None  # a store of fresh views evaluated during training (None: no validation)
    val_images: str | None  # its images file when it holds held-out images (None: the training images)
    val_every: int  # evaluate every N steps (0: only at the end)
    checkpoint_every: int
    keep_checkpoints: int  # >= 2: also RUN_DIR/checkpoint-STEP.pt, the newest N of them
    export_every: int  # 0: exports only at the end
    export_program: bool  # exports carry a torch.export program (model.pt2)
    check_store: bool  # read every store file against its checksums before training
    progress: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace, **resolved) -> "TrainSpec":
        """The spec of parsed arguments; `resolved` gives the fields the command line worked out itself."""
        values = {**vars(args), **resolved}
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls)})


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--recipe, or --teacher with --student (any teacher with any student; docs/custom-models.md)."""
    parser.add_argument("--recipe", metavar="NAME", type=recipe_name(RECIPES, PAIR_SEPARATOR),
                        help=f"teacher_student recipe, one of: {', '.join(RECIPES)}; or TEACHER{PAIR_SEPARATOR}STUDENT "
                             f"(what --teacher with --student make)")
    parser.add_argument("--teacher", metavar="NAME", type=backbone_name(TEACHERS, "teacher", TIMM_PREFIX),
                        help=f"with --student instead of --recipe: {', '.join(TEACHERS)}, or timm:NAME for a timm "
                             f"ViT or Swin (the teacher of the store, or of --teacher-online)")
    parser.add_argument("--student", metavar="NAME", type=backbone_name(STUDENTS, "student", TIMM_PREFIX),
                        help=f"with --teacher instead of --recipe: {', '.join(STUDENTS)}, or timm:NAME for a timm ViT "
                             f"(patch 16) or Swin; the decoder maps its width onto the teacher's")


def chosen_recipe(args: argparse.Namespace) -> str | None:
    """The recipe name the options ask for: --recipe, or --teacher with --student (ConfigError if mixed)."""
    if args.teacher is None and args.student is None:
        return args.recipe
    if args.recipe is not None:
        raise ConfigError("--recipe names the teacher and the student already; pass either --recipe or --teacher "
                          "with --student")
    if args.teacher is None or args.student is None:
        raise ConfigError("--teacher and --student go together (or name a --recipe)")
    return pair_name(args.teacher, args.student)


def resolved_recipe(name: str):
    """The Recipe of a recipe name (a composed one needs timm: call after `select_interpreter`); ConfigError
    naming the teacher or student that cannot be used."""
    from dpal.errors import UserError
    from dpal.pairs import resolve_recipe

    try:
        return resolve_recipe(name)
    except UserError as exc:
        raise ConfigError(str(exc)) from None


def training_on_cpu(device_arg: str) -> bool:
    """Whether `--device device_arg` trains on the CPU (then its batches are pageable, not pinned)."""
    import torch

    return device_arg == "cpu" or (device_arg == "auto" and not torch.cuda.is_available())
