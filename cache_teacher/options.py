"""Command-line options that change how a teacher checkpoint is loaded (shared by every command that loads one)."""
from __future__ import annotations

import argparse

from dpal.config import TeacherSpec
from dpal.teachers import teacher_options


def add_teacher_option_arguments(parser: argparse.ArgumentParser) -> None:
    """--solider-weights / --semantic-weight, for every command that loads a teacher."""
    parser.add_argument("--solider-weights", choices=("teacher", "student"), default="teacher",
                        help="SOLIDER-B only: which weights of the checkpoint to use, 'teacher' (default, as "
                        "SOLIDER's own tools) or 'student' (what the original DPAL used)")
    parser.add_argument("--semantic-weight", type=float, default=0.0,
                        help="SOLIDER-B only: semantic weight s in [0, 1] folded into the weights (default 0.0, "
                        "as the original DPAL)")


def parse_teacher_options(parser: argparse.ArgumentParser, args: argparse.Namespace, teacher: TeacherSpec) -> dict:
    """The validated `load_teacher` options for this teacher; a usage error (exit 2) when they do not apply."""
    try:
        return teacher_options(teacher, solider_weights=args.solider_weights, semantic_weight=args.semantic_weight)
    except ValueError as exc:
        parser.error(str(exc))
