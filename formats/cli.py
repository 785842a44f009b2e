"""The store's and the stages' option vocabulary, importable without torch, zarr or FFCV (so that `--help`
answers at once): the defaults and choices the parsers show, and the options that change how a teacher
checkpoint is loaded. The command-line plumbing itself (argument types, config files, logging, exit
statuses) is `runtime.cli`.
"""
from __future__ import annotations

import argparse

from dpal.config import TeacherSpec
from dpal.recipes import TEACHERS
from runtime.arguments import real

# Defaults shown by `--help`; owned here so the parsers need neither zarr nor FFCV nor torch (the store's own
# names and defaults are the schema's, `formats.schema`).
DEFAULT_MAX_SIDE = 512  # pack: longest side kept
DEFAULT_JPEG_QUALITY = 95  # pack: quality of re-encoded images


# ------------------------------------------------------------------------------ teacher-loading options

def add_teacher_option_arguments(parser: argparse.ArgumentParser) -> None:
    """--solider-weights / --semantic-weight, for every command that loads a teacher."""
    parser.add_argument("--solider-weights", choices=("teacher", "student"), default="teacher",
                        help="SOLIDER-B only: which weights of the checkpoint to use, 'teacher' (default, as "
                        "SOLIDER's own tools) or 'student' (what the original DPAL used)")
    parser.add_argument("--semantic-weight", type=real(0.0, 1.0), default=0.0, metavar="S",
                        help="SOLIDER-B only: semantic weight s in 0..1 folded into the weights (default 0.0, "
                        "as the original DPAL)")


def parse_teacher_options(parser: argparse.ArgumentParser, args: argparse.Namespace, teacher: str | TeacherSpec,
                          teachers: dict[str, TeacherSpec] = TEACHERS) -> dict:
    """The validated `load_teacher` options for this teacher (a name of `teachers`, default the registered ones, or
    `timm:NAME`); a usage error (exit 2) when they do not apply or the teacher cannot be used."""
    from dpal.teachers import teacher_options, teacher_spec

    try:
        spec = teacher_spec(teacher, teachers)
        return teacher_options(spec, solider_weights=args.solider_weights, semantic_weight=args.semantic_weight)
    except ValueError as exc:
        parser.error(str(exc))
