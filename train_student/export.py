"""`train_student export RUN_DIR`: the run's exports made from a checkpoint, and the one place that writes a run's
exports (the trainer calls `write_exports` at the end and every --export-every steps).

A run folder's exports are RUN_DIR/student and RUN_DIR/student_ema, timm local-dir folders (`formats.exports`).
The command works on any checkpoint of the run (a stopped or killed run's included): RUN_DIR/checkpoint.pt, or
one of the checkpoint-STEP.pt that --keep-checkpoints keeps.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXPORT_NAMES = ("student", "student_ema")


def write_exports(run_dir: Path, student, ema_student, *, step: int, recipe: str, global_batch: int | None,
                  program: bool = True) -> list[Path]:
    """RUN_DIR/student and RUN_DIR/student_ema from the trained student and its EMA copy."""
    from formats.exports import export_student

    extra = {"recipe": recipe, "step": step, "global_batch": global_batch}
    return [export_student(student, Path(run_dir) / "student", extra=extra, program=program),
            export_student(ema_student, Path(run_dir) / "student_ema", extra={**extra, "ema": True}, program=program)]


def export_checkpoint(run_dir: Path, checkpoint: Path | None = None, *, program: bool = True) -> list[Path]:
    """The exports of RUN_DIR from `checkpoint` (default RUN_DIR/checkpoint.pt); returns the two folders."""
    import torch

    from dpal.checkpoints import load_exact
    from dpal.pairs import resolve_recipe
    from dpal.students import build_student, materialize
    from train_student.checkpoint import CHECKPOINT_NAME, RUN_CONFIG_NAME, load_checkpoint, recorded_run_id

    run_dir = Path(run_dir)
    checkpoint = run_dir / CHECKPOINT_NAME if checkpoint is None else Path(checkpoint)
    state = load_checkpoint(run_dir, recorded_run_id(run_dir), path=checkpoint, purpose="export")
    recipe = resolve_recipe(state["recipe"])
    students = []
    for key in EXPORT_NAMES:
        with torch.device("meta"):  # every parameter comes from the checkpoint
            student = build_student(recipe)
        student = materialize(student)
        load_exact(student, state[key], checkpoint, "train_student checkpoint", f"{key} of recipe {recipe.name}")
        students.append(student.eval())
    run_config = run_dir / RUN_CONFIG_NAME
    global_batch = json.loads(run_config.read_text()).get("global_batch") if run_config.is_file() else None
    return write_exports(run_dir, *students, step=state["step"], recipe=recipe.name, global_batch=global_batch,
                         program=program)


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_student export",
        description="Write RUN_DIR/student and RUN_DIR/student_ema (timm local-dir folders: config.json, "
                    "model.safetensors, model.pt2) from a checkpoint of the run, e.g. of a stopped run.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by train_student")
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="checkpoint to export (default RUN_DIR/checkpoint.pt, the newest; --keep-checkpoints "
                             "also keeps RUN_DIR/checkpoint-STEP.pt)")
    parser.add_argument("--no-program", dest="program", action="store_false",
                        help="skip the torch.export program model.pt2 (it takes seconds to minutes on a CPU)")
    return parser


def main(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    from runtime.cli import exit_status

    def run() -> int:
        for folder in export_checkpoint(Path(args.run_dir), Path(args.checkpoint) if args.checkpoint else None,
                                        program=args.program):
            print(f"exported {folder}")
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
