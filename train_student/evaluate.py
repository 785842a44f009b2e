"""`python -m train_student evaluate RUN_DIR --store STORE.zarr`: every loss term of a run's student on a store of
fresh views, per image and in total, so that runs can be compared after the fact.

The student is the run's checkpoint (`--weights student`, default), its EMA copy (`--weights ema`) or any export
of the run's student architecture (`--export NAME`); the decoder, which exports do not carry, is always the
checkpoint's. The store must fit the run exactly as `--val-store` must (`train_student.validation`).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from dpal.errors import UserError
from runtime.arguments import real
from runtime.cli import exit_status

EXAMPLE = """examples:
  python -m train_student evaluate runs/vit-ti --store fresh-views.zarr
  python -m train_student evaluate runs/vit-ti --store held-out.zarr --images held-out.beton --weights ema
  python -m train_student evaluate runs/vit-ti --store fresh-views.zarr --export runs/vit-ti/student_ema
"""


class EvaluationError(UserError):
    """RUN_DIR or the export cannot be evaluated as asked."""


def evaluation_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train_student evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a run's student and decoder on a store of fresh views (every stored view set of "
                    "every image once, eval mode): the loss terms per image and in total, printed and written "
                    "as CSV. The store must be of the run's teacher checkpoint, views and backgrounds, and of "
                    "its images cached with another --seed, or of held-out images (--images).", epilog=EXAMPLE)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder of `python -m train_student` (run.json, "
                                                           "checkpoint.pt)")
    parser.add_argument("--store", required=True, metavar="STORE.zarr", help="the store of fresh views")
    parser.add_argument("--images", metavar="IMAGES.beton",
                        help="the images file the store was cached from (default: the run's training images)")
    parser.add_argument("--backgrounds", metavar="BG.beton",
                        help="the background pool (default: the one the run recorded)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--weights", choices=("student", "ema"), default="student",
                       help="which student of the checkpoint (default: student)")
    which.add_argument("--export", metavar="NAME",
                       help="an exported student (a folder written by training or `train_student export`) of the run's "
                            "architecture instead")
    parser.add_argument("--training-views", action="store_true",
                        help="--store is the run's own training store: the loss on the views it trained on, to set "
                             "beside the loss on fresh views (their difference is what reusing views costs)")
    parser.add_argument("--moe-weight", type=real(0.0), metavar="W",
                        help="weight of the gate loss in the total (>= 0; default: the one the run had reached)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="evaluation device (auto: CUDA when visible)")
    parser.add_argument("--out", metavar="FILE.csv",
                        help="per-image CSV (default: RUN_DIR/evaluate_<store name>.csv)")
    return parser


def evaluate(args: argparse.Namespace) -> dict:
    """Evaluate as `args` asks; returns {'per_image': [[...]], 'mean': {...}, 'out': path}."""
    import torch

    import kernels
    from dpal.pairs import resolve_recipe
    from dpal.students import load_student, read_student_config
    from formats.teacher_side import BackgroundPool
    from train_student.checkpoint import CHECKPOINT_NAME, RUN_CONFIG_NAME
    from train_student.metrics import LOSS_COLUMNS
    from runtime.distributed import setup_distributed
    from train_student.step import Distiller, make_autocast
    from train_student.validation import Validation, online_teacher, open_validation_store, store_teacher

    run_dir = Path(args.run_dir)
    config_path, checkpoint_path = run_dir / RUN_CONFIG_NAME, run_dir / CHECKPOINT_NAME
    for path in (config_path, checkpoint_path):
        if not path.is_file():
            raise EvaluationError(f"{path} does not exist; RUN_DIR must be the --out folder of a "
                                  f"`python -m train_student` run that has saved a checkpoint")
    run = json.loads(config_path.read_text())
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    recipe = resolve_recipe(run["recipe"])
    _, _, device = setup_distributed(args.device)
    kernels.register()
    identity = run["store_identity"]
    if run["teacher_online"]:
        if not Path(run["teacher_weights"]).is_file():
            raise EvaluationError(f"the run's teacher checkpoint {run['teacher_weights']} (run.json) is gone; the "
                                  f"store's teacher cannot be checked against it: put it back there")
        teacher = online_teacher(run["teacher_weights"], run["teacher_options"], None)
    else:
        teacher = store_teacher(identity)
    images = args.images or run["images"]
    backgrounds_path = args.backgrounds or run["backgrounds"]
    store = open_validation_store(args.store, recipe=recipe, images=images, backgrounds=backgrounds_path,
                                  teacher=teacher, training_images_fingerprint=run["images_fingerprint"],
                                  training_store_seed=None if identity is None else identity["seed"],
                                  allow_training_views=args.training_views)
    moe_loss_weight = args.moe_weight if args.moe_weight is not None else state.get("moe_weight")
    if moe_loss_weight is None:
        raise EvaluationError(f"{checkpoint_path} does not record the gate-loss weight its run had reached; pass "
                              f"--moe-weight (the recipe's are {recipe.optim.moe_weight})")

    model = Distiller(recipe)
    model.decoder.load_state_dict(state["decoder"])
    if args.export:
        # What the export records beyond the architecture: its run's details and its weights' checksum.
        exported = {key: value for key, value in read_student_config(args.export).items()
                    if key not in ("extra", "weights_sha256")}
        if exported != model.student.config:
            raise EvaluationError(f"--export {args.export} is a {exported.get('student')} export, not the "
                                  f"{model.student.config['student']} of recipe {recipe.name} that RUN_DIR trained; "
                                  f"evaluate it with a run of its own recipe")
        model.student.backbone.load_state_dict(load_student(args.export).state_dict())
        what = f"export {args.export}"
    else:
        model.student.load_state_dict(state["student" if args.weights == "student" else "student_ema"])
        what = f"{checkpoint_path} ({args.weights}, step {state['step']})"
    model.to(device)

    validation = Validation(store, images, BackgroundPool(backgrounds_path), recipe, device)
    per_image = validation.per_image(model.student, model.decoder, moe_loss_weight=moe_loss_weight,
                                     autocast=make_autocast(device, recipe.optim))
    mean = dict(zip(LOSS_COLUMNS, per_image.mean(axis=0).tolist()))
    out = Path(args.out) if args.out else run_dir / f"evaluate_{Path(args.store).name.removesuffix('.zarr')}.csv"
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("image",) + LOSS_COLUMNS)
        for index, row in enumerate(per_image.tolist()):
            writer.writerow([index] + [repr(value) for value in row])
        writer.writerow(["all"] + [repr(value) for value in mean.values()])
    print(f"{what} on {args.store} ({store.num_images} images x {store.views_per_image} view sets, gate-loss "
          f"weight {moe_loss_weight}):")
    print("  ".join(f"{name} {value:.4f}" for name, value in mean.items()))
    print(f"per image: {out}")
    return {"per_image": per_image.tolist(), "mean": mean, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    args = evaluation_parser().parse_args(argv)
    from kernels import select_interpreter
    select_interpreter()  # before anything imports timm, and with it triton
    return exit_status(lambda: evaluate(args) and 0)


if __name__ == "__main__":
    sys.exit(main())
