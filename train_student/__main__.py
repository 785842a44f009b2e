"""`python -m train_student`: train a DPAL student from a cached teacher store (see --help)."""
from __future__ import annotations

import argparse
import os
import sys

from dpal.errors import file_problem
from dpal.recipes import RECIPES
from formats.cli import add_teacher_option_arguments
from formats.schema import DEFAULT_CALIBRATION_IMAGES
from kernels import select_interpreter
from runtime.arguments import NON_NEGATIVE, POSITIVE, SEED, real, worker_count
from runtime.cli import (ConfigError, add_config_arguments, config_text, parse_with_config, read_config_file,
                         set_config_defaults)
from runtime.startup import startup
from train_student.spec import TrainSpec, add_recipe_arguments, chosen_recipe, resolved_recipe, training_on_cpu

EXAMPLE = """examples:
  python -m train_student --list-recipes
  python -m train_student --recipe path-b_vit-ti --store targets.zarr --images persons.beton \\
      --backgrounds backgrounds.beton --out runs/vit-ti
  torchrun --nproc_per_node 8 -m train_student --recipe path-b_vit-ti ... --out runs/vit-ti
  python -m train_student --recipe path-b_vit-ti ... --out runs/vit-ti --resume
  python -m train_student export runs/vit-ti
  python -m train_student --recipe path-b_vit-ti --teacher-online --teacher-weights path-b.pth \\
      --images persons.beton --backgrounds backgrounds.beton --out runs/online
  python -m train_student --teacher timm:vit_small_patch16_224 --student vit-ti --store targets.zarr ...
  python -m train_student --recipe path-b_vit-ti ... --out runs/vit-ti --val-store fresh-views.zarr --val-every 500
  python -m train_student evaluate runs/vit-ti --store fresh-views.zarr
  python -m train_student bench --recipe path-b_vit-ti --store targets.zarr --images persons.beton \\
      --backgrounds backgrounds.beton --teacher-weights path-b.pth --out bench.json

The method (students, decoder, losses, optimisation): docs/method.md in the repository.
"""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--student-weights", metavar="FILE",
                        help="start the student from this timm state dict (.safetensors or .pth; e.g. for "
                             "--student timm:NAME) instead of the recipe's random init")
    parser.add_argument("--store", metavar="STORE.zarr",
                        help="target store written by `python -m cache_teacher run` (not with --teacher-online)")
    parser.add_argument("--images", metavar="IMAGES.beton",
                        help="the images file the store was cached from (`python -m cache_teacher pack`)")
    parser.add_argument("--backgrounds", metavar="BG.beton",
                        help="the background pool the store's crowd views were drawn from")
    parser.add_argument("--batch-size", type=POSITIVE, metavar="N",
                        help="global batch per optimizer step, summed over ranks and accumulation steps (>= 1, "
                             "a multiple of ranks x accumulation steps; default: the recipe's per-GPU batch x "
                             "ranks x accumulation steps)")
    parser.add_argument("--accum-steps", type=POSITIVE, metavar="N",
                        help="gradient accumulation steps (>= 1, default: recipe)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="training device (auto: CUDA when visible)")
    parser.add_argument("--workers", type=worker_count, default=None, metavar="N",
                        help="FFCV decoding threads per rank (1 up to the CPU cores; default: CPU cores / local ranks "
                             "on GPUs, 1 when training on the CPU, whose cores the model needs); they do not "
                             "change what is computed, so a resume may change them")
    parser.add_argument("--window-images", type=POSITIVE, default=1024, metavar="N",
                        help="images shuffled together inside a window of store blocks; larger mixes better "
                             "and holds more target rows in memory (>= 1, default 1024)")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="seed of init, data order and random views (0..4294967295, default 0)")
    parser.add_argument("--reference-path", action="store_true",
                        help="force the plain-PyTorch reference ops instead of the fused Triton kernels")
    parser.add_argument("--teacher-weights", metavar="W.pth",
                        help="teacher checkpoint for --teacher-online (and for the bench's online step)")
    add_teacher_option_arguments(parser)


def training_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train_student", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil a DPAL student from cached teacher targets: FFCV feeds the images, the stored view "
                    "parameters re-render the teacher's exact views on the training device, the targets come "
                    "from the Zarr store. Every default comes from the recipe (docs/method.md, sections 5-7); flags only "
                    "override. Subcommands: `export` (exports from a checkpoint), `evaluate` (a run's checkpoint or an "
                    "export on a store of fresh views), `bench` and `feed-bench` (the target feed's rate per store "
                    "format), each with --help.",
        epilog=EXAMPLE)
    parser.add_argument("--list-recipes", action="store_true",
                        help="print the recipes (teacher, student, decoder input, batch, epochs, lr) and exit")
    add_config_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--out", metavar="RUN_DIR",
                        help="run folder: checkpoint.pt, run.json, metrics.csv, tensorboard/, loss.png and the "
                             "exports student/ and student_ema/ (timm local-dir folders: with `import dpal`, "
                             "timm.create_model('local-dir:RUN_DIR/student_ema'))")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run recorded in --out exactly (bit-identical losses); a change to a "
                             "setting that changes the arithmetic (--compile, --reference-path on CUDA, --device, "
                             "--deterministic, the number of ranks) is refused")
    parser.add_argument("--inexact-resume", action="store_true",
                        help="with --resume: accept such changes, giving up bit-identity with an uninterrupted "
                             "run; said on stderr and recorded in RUN_DIR/run.json (inexact_resumes)")
    group = parser.add_argument_group("optimisation overrides (default: the recipe)")
    group.add_argument("--epochs", type=POSITIVE, metavar="N", help="epochs of the schedule (>= 1)")
    group.add_argument("--warmup-epochs", type=NON_NEGATIVE, metavar="N",
                       help="epochs of linear lr warm-up (>= 0, at most --epochs)")
    group.add_argument("--blr", type=real(0.0, low_open=True), metavar="LR",
                       help="base lr (> 0); lr = blr * global batch / 256")
    group.add_argument("--lr", type=real(0.0, low_open=True), metavar="LR",
                       help="absolute peak lr (> 0; replaces the blr rule)")
    group.add_argument("--min-lr", type=real(0.0), metavar="LR", help="lr at the end of the cosine (>= 0)")
    group.add_argument("--weight-decay", type=real(0.0), metavar="WD", help="AdamW weight decay (>= 0)")
    group = parser.add_argument_group("run control")
    group.add_argument("--max-steps", type=POSITIVE, metavar="N",
                       help="stop after N optimizer steps in total (>= 1; the schedule still spans --epochs)")
    group.add_argument("--checkpoint-every", type=NON_NEGATIVE, default=1000, metavar="N",
                       help="write checkpoint.pt atomically every N steps (>= 0; 0: only at the end, which is "
                            "always written; SIGINT/SIGTERM also write one, at the next step boundary)")
    group.add_argument("--keep-checkpoints", type=POSITIVE, default=1, metavar="N",
                       help="keep the newest N checkpoints as checkpoint-STEP.pt beside checkpoint.pt (>= 1, default "
                            "1: checkpoint.pt alone; each holds student, decoder, EMA and AdamW state)")
    group.add_argument("--export-every", type=NON_NEGATIVE, default=0, metavar="N",
                       help="also write the exports student/ and student_ema/ every N steps (>= 0, default 0: at "
                            "the end only; `train_student export RUN_DIR` makes them from any checkpoint)")
    group.add_argument("--export-program", action=argparse.BooleanOptionalAction, default=True,
                       help="exports carry model.pt2, a torch.export program of the features (default on)")
    group.add_argument("--check-store", action="store_true",
                       help="read every store shard file against its CRC32C before training (minutes for a large "
                            "store; without it each chunk is checked when an epoch reads it)")
    group.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the student and the decoder (around the fused kernels where they run); "
                            "default off: no faster on a 2-core CPU, GPU figure from "
                            "`train_student bench --compile both` (docs/benchmarks.md)")
    group.add_argument("--teacher-online", action="store_true",
                       help="baseline without a store: run the teacher on fresh views at every step "
                            "(needs --teacher-weights)")
    group.add_argument("--calibration-images", type=POSITIVE, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                       help="--teacher-online: images whose teacher tokens calibrate the shape mask "
                            f"(>= 1, default {DEFAULT_CALIBRATION_IMAGES})")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    group = parser.add_argument_group("validation on fresh views (docs/choosing-k.md)")
    group.add_argument("--val-store", metavar="STORE.zarr",
                       help="a store of views training never sees: the training images cached with another --seed "
                            "(`cache_teacher run --limit-images N --seed S`), or held-out images (--val-images); "
                            "same teacher checkpoint, views and backgrounds. Every loss term on it goes to val.csv, "
                            "TensorBoard (val/) and loss.png")
    group.add_argument("--val-images", metavar="IMAGES.beton",
                       help="the images file --val-store was cached from, when it is not --images (held-out images)")
    group.add_argument("--val-every", type=NON_NEGATIVE, default=1000, metavar="N",
                       help="evaluate on --val-store every N steps and at the end (>= 0, default 1000; 0: only at "
                            "the end)")
    return parser


def recipe_table() -> str:
    """The recipes as an aligned table (what --list-recipes prints)."""
    rows = [("recipe", "teacher (D_t)", "student (D_s)", "decoder input", "batch/GPU x accum x GPUs", "epochs",
             "base lr")]
    for recipe in RECIPES.values():
        optim = recipe.optim
        rows.append((recipe.name, f"{recipe.teacher.name} ({recipe.teacher.width})",
                     f"{recipe.student.name} ({recipe.student.width})", str(recipe.decoder.in_dim),
                     f"{optim.batch_per_gpu} x {optim.accum_steps} x {optim.num_gpus}", str(optim.epochs),
                     f"{optim.base_lr:g}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


# run.json entries that are not options: what the inputs resolved to, checked again by the run itself.
_OPTIM_OPTIONS = {"epochs": "epochs", "warmup_epochs": "warmup_epochs", "base_lr": "blr", "min_lr": "min_lr",
                  "weight_decay": "weight_decay", "accum_steps": "accum_steps"}


def options_of_run_record(record: dict) -> dict | None:
    """The options that reproduce a run from its RUN_DIR/run.json (None if `record` is not one): the options
    recorded under their own names, the optimisation the recipe resolved to, the global batch and the teacher
    options; the inputs' identities (fingerprints, the store's attributes) are left to the run, which checks them."""
    if "images_fingerprint" not in record or not isinstance(record.get("optim"), dict):
        return None
    flags = {action.dest for action in training_parser()._actions}
    options = {key: value for key, value in record.items() if key in flags}
    options.update({option: record["optim"][key] for key, option in _OPTIM_OPTIONS.items() if key in record["optim"]})
    options["batch_size"] = record.get("global_batch")
    options.update(record.get("teacher_options") or {})
    return options


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from train_student.bench import main as bench_main
        return bench_main(argv[1:])
    if argv[:1] == ["export"]:
        from train_student.export import main as export_main
        return export_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from train_student.evaluate import main as evaluate_main
        return evaluate_main(argv[1:])
    if argv[:1] == ["feed-bench"]:
        from train_student.feed_bench import main as feed_bench_main
        return feed_bench_main(argv[1:])
    parser = training_parser()
    args = parse_with_config(parser, argv, read_record=options_of_run_record)
    if args.list_recipes:
        print(recipe_table())
        return 0
    if args.print_config:
        print(config_text(parser, args), end="")
        return 0
    try:
        spec = spec_of(args)
    except ConfigError as exc:
        parser.error(str(exc))
    startup(reuse_freed_memory=training_on_cpu(spec.device))  # CPU training feeds pageable batches
    from train_student.train import run_training
    return run_training(spec)


def spec_of(args: argparse.Namespace) -> TrainSpec:
    """The TrainSpec of parsed options, after the checks that involve several of them (ConfigError otherwise)."""
    args.recipe = chosen_recipe(args)
    required = ["--recipe", "--images", "--backgrounds", "--out"] + ([] if args.teacher_online else ["--store"])
    missing = [flag for flag in required if getattr(args, flag[2:].replace("-", "_")) is None]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (or --teacher with --student for --recipe; see --help)"
                          if "--recipe" in missing else f"missing {', '.join(missing)} (see --help)")
    if args.inexact_resume and not args.resume:
        raise ConfigError("--inexact-resume goes with --resume")
    if args.val_images and not args.val_store:
        raise ConfigError("--val-images names the images of --val-store; pass --val-store too")
    if args.student_weights is not None and (problem := file_problem(args.student_weights)):
        raise ConfigError(f"--student-weights {args.student_weights} {problem}")
    select_interpreter()  # before anything imports timm (the teacher options and composed recipes do), and triton
    recipe = resolved_recipe(args.recipe)
    optim = recipe.optim
    epochs = args.epochs or optim.epochs
    warmup = optim.warmup_epochs if args.warmup_epochs is None else args.warmup_epochs
    if warmup > epochs:
        raise ConfigError(f"the warm-up ({warmup} epochs) is longer than the run ({epochs} epochs); pass "
                          f"--warmup-epochs <= {epochs} or more --epochs")
    from dpal.teachers import teacher_options
    from dpal.timm_backbones import view_size_problem
    if problem := view_size_problem(recipe.teacher, recipe.views):
        raise ConfigError(problem)
    try:
        options = teacher_options(recipe.teacher, solider_weights=args.solider_weights,
                                  semantic_weight=args.semantic_weight)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    from train_student.data import default_workers
    return TrainSpec.from_args(args, teacher_options=options, workers=args.workers or default_workers(args.device))


def training_spec(config: str | dict | None = None, **options) -> TrainSpec:
    """A TrainSpec from a config file (YAML/JSON, a run.json) or mapping and keyword options overriding it (the
    command line's option names with underscores), checked exactly as the command line checks them."""
    parser = training_parser()
    data = read_config_file(str(config)) if isinstance(config, (str, os.PathLike)) else dict(config or {})
    set_config_defaults(parser, {**(options_of_run_record(data) or data), **options},
                        source=f"config {config}" if isinstance(config, (str, os.PathLike)) else "options")
    return spec_of(parser.parse_args([]))

if __name__ == "__main__":
    sys.exit(main())
