"""`python -m train_student`: train a DPAL student from a cached teacher store (see --help)."""
from __future__ import annotations

import argparse
import sys

from dpal.recipes import RECIPES, list_recipes
from formats.cli import (DEFAULT_CALIBRATION_IMAGES, NON_NEGATIVE, POSITIVE, SEED, add_teacher_option_arguments,
                         parse_teacher_options, real)
from kernels import select_interpreter
from train_student.spec import TrainSpec

EXAMPLE = """examples:
  python -m train_student --list-recipes
  python -m train_student --recipe path-b_vit-ti --store targets.zarr --images persons.beton \\
      --backgrounds backgrounds.beton --out runs/vit-ti
  torchrun --nproc_per_node 8 -m train_student --recipe path-b_vit-ti ... --out runs/vit-ti
  python -m train_student --recipe path-b_vit-ti ... --out runs/vit-ti --resume
  python -m train_student --recipe path-b_vit-ti --teacher-online --teacher-weights path-b.pth \\
      --images persons.beton --backgrounds backgrounds.beton --out runs/online
  python -m train_student bench --recipe path-b_vit-ti --store targets.zarr --images persons.beton \\
      --backgrounds backgrounds.beton --teacher-weights path-b.pth --out bench.json
"""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="NAME", choices=list_recipes(),
                        help=f"teacher_student recipe, one of: {', '.join(RECIPES)}")
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
    parser.add_argument("--workers", type=POSITIVE, default=None, metavar="N",
                        help="FFCV decoding threads per rank (>= 1; default: CPU cores / local ranks on GPUs, 1 when "
                             "training on the CPU, whose cores the model needs)")
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
                    "from the Zarr store. Every default comes from the recipe (spec sections 5-7); flags only "
                    "override. Subcommands: `bench` (python -m train_student bench --help) and `feed-bench` (the "
                    "target feed's rate per store format).",
        epilog=EXAMPLE)
    parser.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    add_data_arguments(parser)
    parser.add_argument("--out", metavar="RUN_DIR",
                        help="run folder: checkpoint.pt, run.json, metrics.csv, tensorboard/, loss.png and the "
                             "exports student.{safetensors,json}, student_ema.{safetensors,json} "
                             "(dpal.students.load_student rebuilds them as timm models)")
    parser.add_argument("--resume", action="store_true", help="continue the run recorded in --out exactly")
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
    group.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the student (and the decoder where it runs its plain-PyTorch reference, "
                            "i.e. not on CUDA with the fused kernels); default off: no faster on a 2-core CPU, "
                            "GPU figure from `train_student bench --compile both` (README, Benchmarks)")
    group.add_argument("--teacher-online", action="store_true",
                       help="baseline without a store: run the teacher on fresh views at every step "
                            "(needs --teacher-weights)")
    group.add_argument("--calibration-images", type=POSITIVE, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                       help="--teacher-online: images whose teacher tokens calibrate the shape mask "
                            f"(>= 1, default {DEFAULT_CALIBRATION_IMAGES})")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from train_student.bench import main as bench_main
        return bench_main(argv[1:])
    if argv[:1] == ["feed-bench"]:
        from train_student.feed_bench import main as feed_bench_main
        return feed_bench_main(argv[1:])
    parser = training_parser()
    args = parser.parse_args(argv)
    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    required = ["--recipe", "--images", "--backgrounds", "--out"] + ([] if args.teacher_online else ["--store"])
    missing = [flag for flag in required if getattr(args, flag[2:].replace("-", "_")) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)} (see --help)")
    optim = RECIPES[args.recipe].optim
    epochs = args.epochs or optim.epochs
    warmup = optim.warmup_epochs if args.warmup_epochs is None else args.warmup_epochs
    if warmup > epochs:
        parser.error(f"the warm-up ({warmup} epochs) is longer than the run ({epochs} epochs); pass "
                     f"--warmup-epochs <= {epochs} or more --epochs")
    select_interpreter()  # before anything imports timm (the teacher options do), and with it triton
    teacher_options = parse_teacher_options(parser, args, RECIPES[args.recipe].teacher)
    from train_student.data import default_workers
    from train_student.train import run_training
    return run_training(TrainSpec.from_args(args, teacher_options=teacher_options,
                                            workers=args.workers or default_workers(args.device)))


if __name__ == "__main__":
    sys.exit(main())
