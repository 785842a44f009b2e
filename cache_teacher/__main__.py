"""cache_teacher: the one-off stage. Pack images into FFCV, run a teacher once, write a Zarr target store.

Typical use:
  python -m cache_teacher pack LUPerson/ images.beton
  python -m cache_teacher pack backgrounds/ backgrounds.beton
  python -m cache_teacher run --teacher path-b --weights path-b.pth --images images.beton \\
      --backgrounds backgrounds.beton --views-per-image 4 --out path-b.zarr       (--dry-run: storage, reuse)
  python -m cache_teacher run ... --seed 1 --limit-images 256 --views-per-image 2 --out fresh-views.zarr
      (a store of fresh views for `train_student --val-store`: same images, teacher and backgrounds)
  torchrun --nproc_per_node 8 -m cache_teacher run ...                             (same store, N GPUs)
  python -m cache_teacher verify path-b.zarr --weights path-b.pth
  python -m cache_teacher info path-b.zarr
  python -m cache_teacher views grid --images images.beton --backgrounds backgrounds.beton --out views.png
  python -m cache_teacher views bench --batch 256 --devices cpu,cuda --json views-bench.json
`run` is resumable: kill it at any moment and rerun the same command.
The method (views, targets, shape mask): docs/method.md in the repository.
"""
from __future__ import annotations

import argparse
import os
import sys

from dpal.config import TeacherSpec
from dpal.recipes import TEACHERS, TIMM_PREFIX, list_recipes


def cache_parser(teachers: dict[str, TeacherSpec] = TEACHERS) -> argparse.ArgumentParser:
    """The command line of `python -m cache_teacher`, accepting the names of `teachers`."""
    # Only light modules here (no torch, zarr or FFCV): `--help` answers at once.
    from formats.cli import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_SIDE, add_teacher_option_arguments
    from formats.schema import (CODECS, DEFAULT_CALIBRATION_IMAGES, DEFAULT_VIEW_SET_BYTES, RELATION_BITS,
                                TARGET_FORMATS, TOKEN_BITS)
    from runtime.arguments import POSITIVE, SEED, backbone_name, integer, real
    from runtime.cli import add_config_arguments, device_name

    parser = argparse.ArgumentParser(prog="python -m cache_teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pack = commands.add_parser("pack", help="folder tree of images -> FFCV .beton (+ manifest, skip report)",
                               description="Pack a folder tree of images into an FFCV file. JPEGs within "
                               "--max-side are stored byte for byte; PNG/GIF/WebP/BMP, RGBA, 16-bit and oversized "
                               "images are converted to RGB JPEG; each image's CRC32C is recorded. The same folder "
                               "always gives the byte-identical file. Unreadable files and files of other types are "
                               "listed in OUT.beton.skipped.tsv; OUT.beton.manifest.tsv maps sample index -> source "
                               "path (escaped: any file name round-trips, see cache_teacher.pack.read_manifest).")
    pack.add_argument("src", help="source folder (searched recursively for .jpg/.jpeg/.png/.gif/.webp/.bmp)")
    pack.add_argument("out", help="output .beton file")
    pack.add_argument("--max-side", type=integer(16), default=DEFAULT_MAX_SIDE, metavar="PIXELS",
                      help=f"longest side kept, larger images are shrunk (>= 16, default {DEFAULT_MAX_SIDE})")
    pack.add_argument("--jpeg-quality", type=integer(1, 100), default=DEFAULT_JPEG_QUALITY, metavar="Q",
                      help=f"JPEG quality of re-encoded images (1..100, default {DEFAULT_JPEG_QUALITY})")
    pack.add_argument("--workers", type=POSITIVE, default=None, metavar="N",
                      help="processes (>= 1, default: number of CPUs, max 8)")

    teacher_help = (f"teacher: {', '.join(sorted(teachers))}, or timm:NAME for any timm ViT or Swin (width, token "
                    f"grid and stride read off the model; docs/custom-models.md)")
    weights_help = "released teacher checkpoint (.pth); for timm:NAME the model's timm state dict (.safetensors or .pth)"
    run = commands.add_parser("run", help="run a teacher once over K view sets per image, write the target store",
                              description="Draw K view sets per image (seeded by image index), render them, run the "
                              "teacher and write a compressed Zarr v3 store. Resumable (rerun the same command; "
                              "SIGINT/SIGTERM stop it cleanly); under torchrun the shards are split across ranks.")
    teacher_name = backbone_name(teachers, "teacher", TIMM_PREFIX)
    run.add_argument("--teacher", required=True, type=teacher_name, metavar="NAME", help=teacher_help)
    run.add_argument("--weights", required=True, help=weights_help)
    run.add_argument("--images", required=True, help="person images .beton (from `pack`)")
    run.add_argument("--backgrounds", required=True, help="background pool .beton (from `pack`)")
    run.add_argument("--views-per-image", "-K", type=POSITIVE, required=True, metavar="K",
                     help="view sets per image (>= 1)")
    run.add_argument("--out", required=True, help="store folder, e.g. path-b.zarr (created, or resumed)")
    run.add_argument("--views", choices=list_recipes(), default=None, metavar="RECIPE",
                     help="cache the view sets of this recipe's view configuration (its teacher must be --teacher; "
                     "default: the configuration the recipes of --teacher use). The store records it, and training "
                     f"refuses a store cached with other views than its recipe's. Recipes: {', '.join(list_recipes())}")
    run.add_argument("--format", dest="target_format", choices=TARGET_FORMATS, default="float16",
                     help="float16 (lossless compression), int8 with per-row scales, or compact (local tokens on a "
                     "low-rank basis fitted on the calibration images, relation rows as their top-k entries; "
                     "docs/stores.md) (default float16)")
    run.add_argument("--token-rank", type=POSITIVE, default=None, metavar="R",
                     help=f"compact: basis coefficients kept per local token (>= 1, at most the teacher width; default: as many as "
                     f"keep a view set within {DEFAULT_VIEW_SET_BYTES // 1024} KiB and a quarter of float16's)")
    run.add_argument("--token-bits", type=int, choices=TOKEN_BITS, default=8,
                     help="compact: 8 (int8 coefficients with a scale per token, default) or 16 (float16)")
    run.add_argument("--relation-k", type=POSITIVE, default=None, metavar="K",
                     help="compact: entries kept per relation row, the others as their total mass (>= 1, at most the "
                     "crowd tokens; default: all)")
    run.add_argument("--relation-bits", type=int, choices=RELATION_BITS, default=None,
                     help="compact: relation values as 4- or 8-bit log-probability codes with a scale per row, or "
                     "16-bit float probabilities (default: 8 where such rows take at most half of the view set's "
                     "budget, see --token-rank, else 4)")
    run.add_argument("--max-loss-change", type=real(0.0, low_open=True), default=None, metavar="F",
                     help="refuse, before writing anything, a coding whose relative change of any loss term on the "
                     "calibration sample (student at initialisation) exceeds F (> 0, e.g. 0.01; default: no limit)")
    run.add_argument("--plan-gpus", type=POSITIVE, default=8, metavar="N",
                     help="--dry-run's bandwidth table: GPUs reading the store (>= 1, default 8)")
    run.add_argument("--plan-rate", type=real(0.0, low_open=True), default=3000.0, metavar="S",
                     help="--dry-run's bandwidth table: training samples per second per GPU (> 0, default 3000)")
    run.add_argument("--codec", choices=CODECS, default="lz4",
                     help="lossless Blosc codec: lz4 (default; fast to read every epoch) or zstd (smaller, ~4x "
                     "slower to decode)")
    run.add_argument("--seed", type=SEED, default=0, help="seed of the view sets (0..4294967295, default 0)")
    run.add_argument("--batch-size", type=POSITIVE, default=None, metavar="N",
                     help="view sets per teacher batch (>= 1; default 128 CUDA, 8 CPU; a resumed run uses the "
                     "store's). A resume with another batch size is refused: GEMM rounding depends on the batch "
                     "shape, and a store must not mix two")
    run.add_argument("--calibration-images", type=POSITIVE, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                     help="images whose first view set calibrates the shape mask "
                     f"(>= 1, default {DEFAULT_CALIBRATION_IMAGES})")
    run.add_argument("--chunk-images", type=POSITIVE, default=None, metavar="N",
                     help="images per chunk (>= 1, default: smallest power of two with >= 1 MiB chunks)")
    run.add_argument("--shard-images", type=POSITIVE, default=None, metavar="N",
                     help="images per shard, the unit of work and resume (>= 1, a multiple of --chunk-images; default "
                     "~256 MiB of targets)")
    run.add_argument("--limit-images", type=POSITIVE, default=None, metavar="N",
                     help="cache only the first N images (>= 1; a trial)")
    run.add_argument("--device", type=device_name, default=None,
                     help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
    run.add_argument("--dry-run", action="store_true", help="print the storage needed (every format, and the reads "
                     "of training at --plan-gpus x --plan-rate), with --format compact the fidelity of its knobs on "
                     "the calibration sample, and how often training will reuse each view set, and exit")
    run.add_argument("--epochs", type=POSITIVE, default=None, metavar="N",
                     help="epochs the store will be trained for, for --dry-run's reuse count (>= 1, default: the "
                     "recipes' 200)")
    run.add_argument("--skip-space-check", action="store_true", help="do not refuse when the free space looks short")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_teacher_option_arguments(run)
    add_config_arguments(run)

    verify = commands.add_parser("verify",
                                 help="check completeness + checksums, re-render a sample and rerun the teacher",
                                 description="Exit status 0 only if every shard is finished and intact and a random "
                                 "sample of stored view sets matches a fresh teacher run within the format's limits.")
    verify.add_argument("store", help="store folder written by `run`")
    verify.add_argument("--weights", help="the checkpoint the store was made with (not with --checksums-only)")
    verify.add_argument("--checksums-only", action="store_true",
                        help="check completeness and every checksum (store shards, images) without the teacher")
    verify.add_argument("--images", default=None, help="images .beton (default: the path recorded in the store)")
    verify.add_argument("--backgrounds", default=None,
                        help="background pool .beton (default: the path recorded in the store)")
    verify.add_argument("--samples", type=POSITIVE, default=8, metavar="N",
                        help="view sets to re-render and compare (>= 1, default 8)")
    verify.add_argument("--seed", type=SEED, default=0, help="seed of the sample drawn (0..4294967295, default 0)")
    verify.add_argument("--device", type=device_name, default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")

    info = commands.add_parser("info", help="what a store holds: identity, progress, bytes per view set, compression")
    info.add_argument("store", help="store folder written by `run`")

    bench = commands.add_parser("bench", help="teacher-forward-only vs full caching pipeline throughput (table + JSON)")
    bench.add_argument("--teacher", required=True, type=teacher_name, metavar="NAME", help=teacher_help)
    bench.add_argument("--weights", required=True, help=weights_help)
    bench.add_argument("--images", required=True, help="person images .beton (from `pack`)")
    bench.add_argument("--backgrounds", required=True, help="background pool .beton (from `pack`)")
    bench.add_argument("--batch-size", type=POSITIVE, default=None, metavar="N",
                       help="view sets per teacher batch (>= 1; default 128 CUDA, 8 CPU)")
    bench.add_argument("--iterations", type=POSITIVE, default=5, metavar="N",
                       help="teacher-only batches timed (>= 1, default 5)")
    bench.add_argument("--num-images", type=POSITIVE, default=None, metavar="N",
                       help="images through the full pipeline (>= 1, default: iterations x batch / K)")
    bench.add_argument("--views-per-image", type=POSITIVE, default=2, metavar="K",
                       help="view sets per image in the pipeline (>= 1, default 2)")
    bench.add_argument("--format", dest="target_format", choices=TARGET_FORMATS, default="float16",
                       help="target format written by the pipeline (default float16)")
    bench.add_argument("--device", type=device_name, default=None,
                       help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    bench.add_argument("--json", dest="json_out", default="cache_bench.json",
                       help="where to write the figures (default cache_bench.json)")
    add_teacher_option_arguments(bench)

    demo = commands.add_parser("demo-data",
                               help="write built-in inputs: synthetic persons, backgrounds, random teacher")
    demo.add_argument("out_dir", help="folder to write persons/, backgrounds/ and TEACHER.pth into")
    demo.add_argument("--persons", type=POSITIVE, default=None, metavar="N",
                      help="synthetic person images (>= 1, default: the demo's count)")
    demo.add_argument("--backgrounds", type=POSITIVE, default=None, metavar="N",
                      help="background images (>= 1, default: the demo's count)")
    demo.add_argument("--teacher", choices=sorted(TEACHERS), default="path-b",
                      help="architecture of the random-weight teacher checkpoint (default path-b)")
    _add_views_command(commands)
    return parser


def _add_views_command(commands) -> None:
    from runtime.arguments import POSITIVE, SEED, output_file
    from runtime.cli import device_names

    views = commands.add_parser("views", help="view sets rendered from their records: a picture, or a benchmark",
                                description="Render view sets exactly as `run` and training do. `grid`: a PNG of "
                                "a few, side by side; `bench`: the speed of the render calls. Image sources: an "
                                "FFCV .beton (from `pack`), a folder of JPEG/PNG images, or one image file.")
    kinds = views.add_subparsers(dest="views_command", required=True, metavar="VIEWS_COMMAND")
    grid = kinds.add_parser("grid", help="PNG grid of view sets: source, global, local crops, crowd",
                            description="Render a few view sets and save them de-normalized side by side: source "
                            "image | global view | local crops | crowd view.")
    grid.add_argument("--images", required=True, help="person images: .beton, folder or image file")
    grid.add_argument("--backgrounds", required=True, help="background pool: .beton, folder or image file")
    grid.add_argument("--num", type=POSITIVE, default=6, help="view sets to show (>= 1, default 6)")
    grid.add_argument("--seed", type=SEED, default=0, help="seed of the images and view sets drawn (0..4294967295, "
                      "default 0)")
    grid.add_argument("--out", type=output_file, default="views.png", help="PNG to write (default views.png)")

    bench = kinds.add_parser("bench", help="views per second of render_view_sets + render_local_crops",
                             description="Time one training batch of views: render_view_sets (global + crowd) and "
                             "render_local_crops (2 per image), per device; print a table, optionally JSON. On CUDA "
                             "it also times a ViT-Ti student forward+backward on the same views, the step the "
                             "rendering must stay well under (target: < 10%%).")
    bench.add_argument("--batch", type=POSITIVE, default=256, help="view sets per batch (>= 1, default 256, the recipe's)")
    bench.add_argument("--devices", type=device_names, default=None,
                       help="comma-separated: cpu, cuda, cuda:N (default: cpu, and cuda where there is one)")
    bench.add_argument("--repeats", type=POSITIVE, default=3, help="timed runs per measurement, after one warm-up (>= 1)")
    bench.add_argument("--images", help="person images to render instead of synthetic ones (.beton, folder or image)")
    bench.add_argument("--backgrounds", help="background pool for --images")
    bench.add_argument("--student-step", choices=("auto", "on", "off"), default="auto",
                       help="also time a ViT-Ti student forward+backward (auto: on CUDA only)")
    bench.add_argument("--seed", type=SEED, default=0, help="seed of the synthetic images and view sets (0..4294967295, "
                       "default 0)")
    bench.add_argument("--json", type=output_file, help="write the results here as JSON (its folder must exist)")


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand `name`."""
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices[name]


def caching_spec(config=None, *, teachers: dict[str, TeacherSpec] = TEACHERS, **options):
    """A checked `cache_teacher.run.RunConfig` from a config file (YAML/JSON) or mapping, with keyword options (the
    `run` command's option names, underscores for dashes) overriding it, checked as the command line checks them."""
    from runtime.cli import ConfigError, read_config_file, set_config_defaults
    from dpal.teachers import teacher_options, teacher_spec

    run_parser = subcommand_parser(cache_parser(teachers), "run")
    data = read_config_file(str(config)) if isinstance(config, (str, os.PathLike)) else dict(config or {})
    source = f"config {config}" if isinstance(config, (str, os.PathLike)) else "options"
    set_config_defaults(run_parser, {**data, **options}, source=source)
    missing = [action.option_strings[0] for action in run_parser._actions if action.required]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (see python -m cache_teacher run --help)")
    args = run_parser.parse_args([])
    try:
        teacher_options(teacher_spec(args.teacher, teachers), solider_weights=args.solider_weights,
                        semantic_weight=args.semantic_weight)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    from cache_teacher.run import RunConfig
    return RunConfig(**{k: v for k, v in vars(args).items() if k not in ("config", "print_config")})


def main(argv=None, *, teachers: dict[str, TeacherSpec] = TEACHERS) -> int:
    from formats.cli import parse_teacher_options
    from runtime.cli import config_text, exit_status, parse_with_config, setup_logging
    from runtime.startup import startup

    parser = cache_parser(teachers)
    argv = sys.argv[1:] if argv is None else list(argv)
    run_parser = subcommand_parser(parser, "run")
    args = parse_with_config(parser, argv, options_parser=run_parser) if argv[:1] == ["run"] else \
        parser.parse_args(argv)
    startup()
    if args.command == "verify" and not args.weights and not args.checksums_only:
        parser.error("verify needs --weights (the checkpoint the store was made with), or --checksums-only")
    if args.command == "views" and args.views_command == "bench" and bool(args.images) != bool(args.backgrounds):
        parser.error("views bench: give both --images and --backgrounds, or neither (synthetic images)")
    if args.command == "run" and args.print_config:
        print(config_text(run_parser, args), end="")
        return 0
    if args.command in ("run", "bench"):
        args.teacher_options = parse_teacher_options(parser, args, args.teacher, teachers)
    setup_logging()
    # A stopped run keeps its finished shards: say so, and how to go on.
    stop_message = f"; finished shards of {args.out} are kept, rerun the same command to resume" \
        if args.command == "run" else None
    return exit_status(lambda: _command(args, teachers), stop_message=stop_message)


def _command(args: argparse.Namespace, teachers: dict[str, TeacherSpec]) -> int:
    """Run one parsed command; its exit status (1: `verify` found a problem)."""
    if args.command == "pack":
        from cache_teacher.pack import pack
        pack(args.src, args.out, max_side=args.max_side, quality=args.jpeg_quality, workers=args.workers)
    elif args.command == "run":
        from cache_teacher.run import RunConfig, run
        fields = {k: v for k, v in vars(args).items()
                  if k not in ("command", "teacher_options", "config", "print_config")}
        run(RunConfig(**fields), teachers=teachers)
    elif args.command == "verify":
        from cache_teacher.verify import verify
        passed, _ = verify(args.store, args.weights, images=args.images, backgrounds=args.backgrounds,
                           checksums_only=args.checksums_only,
                           samples=args.samples, seed=args.seed, device=args.device, teachers=teachers)
        return 0 if passed else 1
    elif args.command == "info":
        from cache_teacher.verify import info
        info(args.store)
    elif args.command == "bench":
        from cache_teacher.bench import bench
        bench(args.teacher, args.weights, args.images, args.backgrounds, batch_size=args.batch_size,
              iterations=args.iterations, num_images=args.num_images, views_per_image=args.views_per_image,
              target_format=args.target_format, device=args.device, json_out=args.json_out,
              teacher_options=args.teacher_options, teachers=teachers)
    elif args.command == "views":
        from cache_teacher.views import bench, grid
        (bench if args.views_command == "bench" else grid)(args)
    elif args.command == "demo-data":
        from cache_teacher.demo_data import DEFAULT_BACKGROUNDS, DEFAULT_PERSONS, write_demo_data
        write_demo_data(args.out_dir, persons=args.persons or DEFAULT_PERSONS,
                        backgrounds=args.backgrounds or DEFAULT_BACKGROUNDS, teacher=args.teacher)
    return 0


if __name__ == "__main__":
    sys.exit(main())
