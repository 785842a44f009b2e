"""`python -m cache_teacher run`: draw K view sets per image, run the teacher once, write the target store.

Determinism: the K view sets of image i come from a generator seeded by (seed, i) alone
(`formats.view_records`), and every shard is
computed with the same batch boundaries (relative to the shard) however the work is split, resumed or
distributed; so a resumed run, a run on N ranks and an uninterrupted single run write the same targets.
Work is split by shard ownership (shard s belongs to rank s mod world size); each shard has one writer,
and each store one job: rank 0 holds the store's writer lock for the whole run (`job_writer_lock`), so a
second `run` on the same --out is refused before it reads or writes anything. A rerun rechecks every finished
shard against its recorded CRC32C and rewrites those that fail (the repair of a damaged store).
The teacher stays busy (`cache_teacher.pipeline`): the next batch of view sets is rendered on another
thread (and CUDA stream) while the teacher runs this one, its targets come back to the host without
blocking, and shards are decoded and written on threads of their own. `RunConfig.overlap=False` runs the
serial path instead (render, teacher, copy back, one after the other), which writes the same bytes.
"""
from __future__ import annotations

import dataclasses
import errno
import math
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cache_teacher.fidelity import (FIDELITY_VIEW_SETS, budget_problem, fidelity, figures_table, merge,
                                    student_probe, summarise)
from cache_teacher.pipeline import decoded_shards, process_shards, shard_arrays
from dpal.config import OptimConfig, TeacherSpec, ViewConfig
from dpal.errors import UserError, file_problem
from dpal.recipes import RECIPES, TEACHERS
from dpal.shape_mask import ShapeMaskCalibration
from dpal.teachers import Teacher, load_teacher, teacher_options, teacher_spec
from dpal.timm_backbones import is_timm_name, view_size_problem
from dpal.views import VIEW_SET_FIELDS
from formats.images import ImageFile, images_fingerprint
from formats.schema import (CODECS, DEFAULT_CALIBRATION_IMAGES, DEFAULT_VIEW_SET_BYTES, TARGET_FORMATS, TOKEN_RANK_STEP,
                            CompactKnobs)
from formats.store import (StoreLayout, StoreSpec, StoreWriter, check_format_version, check_spec_version,
                           describe_differences, file_sha256, plan_layout, read_attrs, read_compact_coding,
                           store_lock_path, token_counts)
from formats.targets import CompactCoding, TokenBasis
from formats.teacher_side import BackgroundPool, TeacherSide, teacher_precision
from formats.view_records import describe_view_set_reuse, image_view_params
from runtime.cli import note_adjusted
from runtime.distributed import barrier, is_rank0, setup_distributed
from runtime.durable import WriterRefusedError, job_writer_lock


class RunError(UserError):
    """Bad input or environment for `run`; the message says what to do."""


@dataclass(frozen=True)
class RunConfig:
    teacher: str
    weights: str
    images: str
    backgrounds: str
    views_per_image: int
    out: str
    target_format: str = "float16"
    codec: str = "lz4"
    seed: int = 0
    batch_size: int | None = None  # view sets per teacher batch; default 128 on CUDA, 8 on CPU
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    chunk_images: int | None = None
    shard_images: int | None = None
    device: str | None = None
    dry_run: bool = False
    skip_space_check: bool = False
    progress: bool = True
    limit_images: int | None = None  # cache only the first N images (a trial run; recorded in the store)
    solider_weights: str = "teacher"  # SOLIDER container: 'teacher' (SOLIDER's tools) or 'student' (original DPAL)
    semantic_weight: float = 0.0  # SOLIDER's s, folded into the weights
    views: str | None = None  # recipe whose view configuration to cache (default: that of --teacher's recipes)
    epochs: int | None = None  # training epochs the store is meant for (the dry run's reuse count; default 200)
    overlap: bool = True  # the double-buffered pipeline (cache_teacher.pipeline); False: render, then teacher
    token_rank: int | None = None  # compact knobs (formats.schema.CompactKnobs); None: `compact_knobs` decides
    token_bits: int = 8
    relation_k: int | None = None  # None: every entry
    relation_bits: int | None = None  # None: `compact_knobs` decides
    max_loss_change: float | None = None  # refuse knobs whose relative loss change exceeds this (fidelity)
    plan_gpus: int = 8  # --dry-run's scale table: GPUs reading the store ...
    plan_rate: float = 3000.0  # ... at this many samples per second each

    def compact_knobs(self, spec: TeacherSpec, view_cfg: ViewConfig) -> CompactKnobs | None:
        return compact_knobs(spec, view_cfg, token_rank=self.token_rank, token_bits=self.token_bits,
                             relation_k=self.relation_k, relation_bits=self.relation_bits) \
            if self.target_format == "compact" else None


def compact_knobs(spec: TeacherSpec, view_cfg: ViewConfig, *, token_rank: int | None = None, token_bits: int = 8,
                  relation_k: int | None = None, relation_bits: int | None = None) -> CompactKnobs:
    """The knobs asked for. Those not given fit a view set, uncompressed and everything included, into the
    smaller of DEFAULT_VIEW_SET_BYTES and a quarter of the float16 view set: k every entry; relation bits 8
    where 8-bit rows take at most half of that (SOLIDER-B's 64 x 64), else 4 (PATH-B's 257 x 257); rank the
    largest multiple of TOKEN_RANK_STEP (at most the width) that fits."""
    _, tokens, crowd_tokens = token_counts(spec, view_cfg)
    float16 = plan_layout(spec, view_cfg, num_images=1, views_per_image=1, view_fields=VIEW_SET_FIELDS,
                          target_format="float16", chunk_images=1, shard_images=1)
    budget = min(DEFAULT_VIEW_SET_BYTES, sum(float16.bytes_per_view_set().values()) // 4)
    relation_k = relation_k or crowd_tokens
    if relation_bits is None:
        relation_bits = 8 if crowd_tokens * relation_k <= budget // 2 else 4
    if token_rank is not None:
        return CompactKnobs(token_rank, token_bits, relation_k, relation_bits)
    fitting = [rank for rank in range(TOKEN_RANK_STEP, spec.width + TOKEN_RANK_STEP, TOKEN_RANK_STEP)
               if _view_set_bytes(spec, view_cfg, CompactKnobs(min(rank, spec.width), token_bits, relation_k,
                                                               relation_bits)) <= budget]
    return CompactKnobs(min(max(fitting, default=TOKEN_RANK_STEP), spec.width), token_bits, relation_k, relation_bits)


def _view_set_bytes(spec: TeacherSpec, view_cfg: ViewConfig, knobs: CompactKnobs) -> int:
    layout = plan_layout(spec, view_cfg, num_images=1, views_per_image=1, view_fields=VIEW_SET_FIELDS,
                         target_format="compact", compact=knobs, chunk_images=1, shard_images=1)
    return sum(layout.bytes_per_view_set().values())


def cached_views(teacher: str, recipe: str | None = None) -> ViewConfig:
    """The view configuration a store of `teacher` is cached with: recipe `recipe`'s (whose teacher must be this
    one), or else the one every recipe of this teacher uses (the spec's default views for a teacher that no
    recipe uses). The store records it, and a trainer refuses a store cached with other views than its recipe's."""
    if recipe is not None:
        if recipe not in RECIPES:
            raise RunError(f"unknown recipe {recipe!r} for --views; choose one of {', '.join(RECIPES)}")
        if RECIPES[recipe].teacher.name != teacher:
            raise RunError(f"--views {recipe}: that recipe distils {RECIPES[recipe].teacher.name}, not {teacher}; "
                           f"name a recipe of teacher {teacher}")
        return RECIPES[recipe].views
    views = {r.name: r.views for r in RECIPES.values() if r.teacher.name == teacher}
    if len(set(views.values())) > 1:
        raise RunError(f"the recipes of teacher {teacher} use different view configurations; name the one to "
                       f"cache with --views RECIPE (one of {', '.join(views)})")
    return next(iter(views.values()), ViewConfig())


def default_batch_size(device: torch.device) -> int:
    """View sets per teacher batch when --batch-size is not given."""
    return 128 if device.type == "cuda" else 8


class TargetComputer(TeacherSide):
    """The teacher side as the cache run drives it: a shard's view sets in batches, and the fidelity sample."""

    def fidelity_sample(self, images: ImageFile, indices: list[int], seed: int, views_per_image: int,
                        calibration: ShapeMaskCalibration, target_format: str) -> dict[str, list[float]]:
        """`cache_teacher.fidelity` figures of this coding on the first view set of each of `indices`."""
        probe, parts = student_probe(self.teacher.spec), []
        for views in self.rendered_first_view_sets(images, indices, seed, views_per_image):
            out = self.run_teacher(views.global_view, views.crowd)
            parts.append(fidelity(self.encode(out, calibration, target_format), self.float_targets(out, calibration),
                                  {"global_view": views.global_view, "crowd_view": views.crowd}, probe))
        return merge(parts)

    def shard_batches(self, images: list[np.ndarray], params: torch.Tensor):
        """(row slice, images, view sets) of each teacher batch of one shard; params [n, K, F]. Batches start at
        the shard start, whatever the work split, so a shard's targets never depend on how the run went."""
        n, k = params.shape[:2]
        flat = params.reshape(n * k, -1)
        owner = torch.arange(n).repeat_interleave(k)
        tensors = [torch.from_numpy(image) for image in images]
        for start in range(0, n * k, self.batch_size):
            rows = slice(start, start + self.batch_size)
            yield rows, [tensors[i] for i in owner[rows].tolist()], flat[rows]

    def shard_rows(self, images: list[np.ndarray], params: torch.Tensor, calibration: ShapeMaskCalibration,
                   target_format: str, progress=None) -> dict[str, np.ndarray]:
        """Stored arrays for the images of one shard, one batch after the other (the serial path)."""
        parts: dict[str, list[torch.Tensor]] = {}
        for _, batch_images, batch_params in self.shard_batches(images, params):
            encoded = self.encode(self.targets(batch_images, batch_params), calibration, target_format).arrays()
            for name, value in encoded.items():
                parts.setdefault(name, []).append(value.cpu())
            if progress is not None:
                progress.update(len(batch_params))
        return shard_arrays(parts, params)


def _format_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def storage_table(layout: StoreLayout) -> str:
    per_set = layout.bytes_per_view_set()
    total_sets = layout.num_images * layout.views_per_image
    lines = [f"{'array':<15}{'bytes/view set':>16}{'total (uncompressed)':>24}"]
    lines += [f"{name:<15}{size:>16,}{_format_bytes(size * total_sets):>24}" for name, size in per_set.items()]
    lines.append(f"{'all':<15}{sum(per_set.values()):>16,}{_format_bytes(sum(per_set.values()) * total_sets):>24}")
    return "\n".join(lines)


# Read bandwidth -> storage that serves it to one node (rough classes, for planning).
STORAGE_CLASSES = ((1e9, "a shared filesystem (NFS) or one SATA SSD"),
                   (5e9, "one local NVMe drive or a parallel filesystem"),
                   (20e9, "several local NVMe drives striped (RAID 0)"),
                   (math.inf, "RAM only (page cache): more than local drives give"))


def storage_class(bytes_per_second: float) -> str:
    return next(kind for limit, kind in STORAGE_CLASSES if bytes_per_second <= limit)


def scale_rows(spec: TeacherSpec, view_cfg: ViewConfig, *, num_images: int, views_per_image: int, gpus: int,
               rate: float, compact: CompactKnobs | None = None) -> list[dict]:
    """Per target format: bytes per view set (uncompressed), store size, the read bandwidth `gpus` GPUs at
    `rate` samples/s each need (one view set per sample), and the storage that serves it."""
    rows = []
    for target_format in TARGET_FORMATS:
        knobs = (compact or compact_knobs(spec, view_cfg)) if target_format == "compact" else None
        layout = plan_layout(spec, view_cfg, num_images=num_images, views_per_image=views_per_image,
                             view_fields=VIEW_SET_FIELDS, target_format=target_format, compact=knobs)
        per_set = sum(layout.bytes_per_view_set().values())
        bandwidth = per_set * gpus * rate
        rows.append({"format": target_format, "knobs": knobs.to_dict() if knobs else None,
                     "bytes_per_view_set": per_set, "store_bytes": per_set * num_images * views_per_image,
                     "bytes_per_second": bandwidth, "storage": storage_class(bandwidth)})
    return rows


def scale_table(rows: list[dict], *, gpus: int, rate: float) -> str:
    lines = [f"{'format':<9}{'B/view set':>12}{'store':>12}{f'read at {gpus} GPUs x {rate:g}/s':>28}  served by"]
    lines += [f"{r['format']:<9}{r['bytes_per_view_set']:>12,}{_format_bytes(r['store_bytes']):>12}"
              f"{_format_bytes(r['bytes_per_second']) + '/s':>28}  {r['storage']}" for r in rows]
    return "\n".join(lines)


def _open_inputs(cfg: RunConfig) -> tuple[ImageFile, BackgroundPool]:
    images, backgrounds = ImageFile(cfg.images), BackgroundPool(cfg.backgrounds)
    if len(images) == 0:
        raise RunError(f"images file {cfg.images} holds no images")
    if len(backgrounds) == 0:
        raise RunError(f"backgrounds file {cfg.backgrounds} holds no images; the crowd view needs a background pool")
    return images, backgrounds


def _check_output(out: Path, needed_bytes: int, skip_space_check: bool) -> None:
    parent = out.resolve().parent
    if not parent.is_dir():
        raise RunError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise RunError(f"cannot write {out}: {parent if not out.exists() else out} is not writable")
    free = shutil.disk_usage(parent).free
    if not skip_space_check and needed_bytes > free:
        raise RunError(f"{out} needs up to {_format_bytes(needed_bytes)} (uncompressed bound, see --dry-run) but "
                       f"only {_format_bytes(free)} is free on that disk; free space, or pass --skip-space-check "
                       f"if you know compression will make it fit")


def run(cfg: RunConfig, *, teachers: dict[str, TeacherSpec] = TEACHERS) -> dict:
    """Create or resume the store of ``cfg``; returns a summary. Safe to kill at any moment and rerun."""
    spec, view_cfg = teacher_spec(cfg.teacher, teachers), cached_views(cfg.teacher, cfg.views)
    if problem := view_size_problem(spec, view_cfg):
        raise RunError(problem)
    if cfg.views_per_image < 1:
        raise RunError(f"--views-per-image must be >= 1 (got {cfg.views_per_image})")
    if cfg.codec not in CODECS:
        raise RunError(f"unknown codec {cfg.codec!r}; choose one of {', '.join(CODECS)}")
    images, backgrounds = _open_inputs(cfg)
    num_images = len(images) if cfg.limit_images is None else min(cfg.limit_images, len(images))
    if num_images < 1:
        raise RunError(f"--limit-images must be >= 1 (got {cfg.limit_images})")
    layout = plan_layout(spec, view_cfg, num_images=num_images, views_per_image=cfg.views_per_image,
                         view_fields=VIEW_SET_FIELDS, target_format=cfg.target_format,
                         chunk_images=cfg.chunk_images, shard_images=cfg.shard_images,
                         compact=cfg.compact_knobs(spec, view_cfg))
    total_bytes = sum(layout.bytes_per_view_set().values()) * layout.num_images * layout.views_per_image
    grid, _, crowd_tokens = token_counts(spec, view_cfg)
    if cfg.dry_run:
        scale = scale_rows(spec, view_cfg, num_images=layout.num_images, views_per_image=layout.views_per_image,
                           gpus=cfg.plan_gpus, rate=cfg.plan_rate, compact=layout.compact)
        print(f"dry run: teacher {spec.name}, {layout.num_images} images x K={layout.views_per_image} view sets, "
              f"format {layout.target_format}; {layout.num_shards} shard(s) of {layout.shard_images} images, chunks "
              f"of {layout.chunk_images} images\n{storage_table(layout)}\nneeds at most {_format_bytes(total_bytes)} "
              f"(uncompressed bound; lossless compression saves ~10% with lz4, ~30% with zstd on PATH-B float16)\n"
              f"every format at this size (uncompressed), and the reads of training at --plan-gpus x --plan-rate:\n"
              f"{scale_table(scale, gpus=cfg.plan_gpus, rate=cfg.plan_rate)}\n"
              f"{describe_view_set_reuse(cfg.epochs or OptimConfig().epochs, layout.views_per_image)}")
        result = {"dry_run": True, "bytes": total_bytes, "layout": dataclasses.asdict(layout), "scale": scale}
        if layout.compact is not None:  # what the knobs cost, measured on a sample
            device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            computer = TargetComputer(_load_teacher(cfg, spec, device), backgrounds, view_cfg, device,
                                      cfg.batch_size or default_batch_size(device))
            _, summary = _fit_coding(computer, images, cfg, layout)
            problem = budget_problem(summary, cfg.max_loss_change)
            print(f"fidelity of these knobs on {min(FIDELITY_VIEW_SETS, cfg.calibration_images)} view sets of the "
                  f"calibration sample (--max-loss-change {cfg.max_loss_change}: "
                  f"{problem or 'within budget'}):\n{figures_table(summary)}")
            result["fidelity"] = summary
        return result
    weights = Path(cfg.weights)
    if problem := file_problem(weights):
        raise RunError(f"teacher checkpoint {weights} {problem}")
    out = Path(cfg.out)

    rank, world, device = setup_distributed(cfg.device)
    _check_output(out, 0 if out.exists() else total_bytes, cfg.skip_space_check)
    try:
        lock = job_writer_lock(store_lock_path(out), f"store {out}")
    except WriterRefusedError as exc:
        raise RunError(str(exc)) from None
    try:  # everything below, the identity check first, happens under the lock
        resumed = read_attrs(out, "--out") if out.exists() else {}
        # A resumed run keeps the store's batch size unless told otherwise: GEMM rounding depends on the batch
        # shape, so a store written with two batch sizes would not equal one written in a single run.
        batch_size = cfg.batch_size or resumed.get("batch_size") or default_batch_size(device)
        store_spec = StoreSpec(
            teacher_spec=spec, view_config=view_cfg, checkpoint_sha256=file_sha256(weights),
            teacher_options=teacher_options(spec, solider_weights=cfg.solider_weights,
                                            semantic_weight=cfg.semantic_weight),
            teacher_precision=teacher_precision(device),
            images_fingerprint=images_fingerprint(cfg.images),
            backgrounds_fingerprint=images_fingerprint(cfg.backgrounds),
            num_images=layout.num_images, num_backgrounds=len(backgrounds), views_per_image=layout.views_per_image,
            seed=cfg.seed, calibration_images=min(cfg.calibration_images, layout.num_images), batch_size=batch_size,
            target_format=layout.target_format, codec=cfg.codec, chunk_images=layout.chunk_images,
            shard_images=layout.shard_images, token_grid=grid, compact=layout.compact)
        note_adjusted("--calibration-images", cfg.calibration_images, store_spec.calibration_images,
                      f"{cfg.images} holds {layout.num_images} images")
        identity = store_spec.identity()
        if resumed:
            _check_resumable(out, resumed, identity)

        computer = TargetComputer(_load_teacher(cfg, spec, device), backgrounds, view_cfg, device, batch_size)
        if not out.exists() and rank == 0:
            for stale in out.parent.glob(f"{out.name}.creating-*"):
                shutil.rmtree(stale, ignore_errors=True)
            calibration, summary = _fit_coding(computer, images, cfg, layout)
            if problem := budget_problem(summary, cfg.max_loss_change):
                raise RunError(f"{problem} on the calibration sample (format {layout.target_format}"
                               + (f", knobs {layout.compact.to_dict()}" if layout.compact else "")
                               + "); nothing was written: raise --token-rank, --relation-k or the bits, or allow "
                               "a larger change")
            attrs = dict(identity, mask_calibration=calibration.to_dict(), view_fields=VIEW_SET_FIELDS,
                         crowd_tokens=crowd_tokens, images_path=str(Path(cfg.images).resolve()),
                         backgrounds_path=str(Path(cfg.backgrounds).resolve()), store_id=uuid.uuid4().hex,
                         fidelity=summary, max_loss_change=cfg.max_loss_change,
                         **({"weights_file": weights.name} if is_timm_name(spec.name) else {}))
            StoreWriter.create(out, attrs, layout, basis=computer.compact.basis if computer.compact else None)
        barrier()
        attrs = resumed or read_attrs(out, "--out")  # read back only when this run (or rank 0) just created the store
        writer = StoreWriter(out, layout)  # the identity check pinned every layout field
        computer.compact = read_compact_coding(out, attrs, layout)
        calibration = ShapeMaskCalibration.from_dict(attrs["mask_calibration"])
        owned = [s for s in range(layout.num_shards) if s % world == rank]
        repaired = _forget_damaged_shards(writer, [s for s in owned if writer.is_done(s)], cfg.progress)
        todo = [s for s in owned if not writer.is_done(s)]

        def sets_in(shards: list[int]) -> int:
            return sum(stop - start for start, stop in map(layout.shard_range, shards)) * layout.views_per_image

        started = time.perf_counter()

        def load(shard: int) -> tuple[list[np.ndarray], torch.Tensor]:
            """A shard's decoded images and view sets [n, K, F]."""
            start, stop = layout.shard_range(shard)
            params = torch.stack([image_view_params(cfg.seed, i, layout.views_per_image, len(backgrounds), view_cfg)
                                  for i in range(start, stop)])
            return [images.image(i) for i in range(start, stop)], params

        try:
            (process_shards if cfg.overlap else _process_shards)(
                todo, load, writer, computer, calibration, layout.target_format,
                tqdm(total=sets_in(owned), initial=sets_in(owned) - sets_in(todo), unit="view set",
                     desc=f"cache {spec.name}" + (f" rank {rank}/{world}" if world > 1 else ""),
                     disable=not cfg.progress, smoothing=0.1, dynamic_ncols=True))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise RunError(f"disk full while writing {out}: finished shards are kept and the interrupted one is "
                               f"not marked done; free space and rerun the same command to resume") from exc
            raise
        elapsed = time.perf_counter() - started
        barrier()
        done = sum(writer.is_done(s) for s in range(layout.num_shards))
        if rank == 0:
            print(f"{out}: {done}/{layout.num_shards} shards done; rank 0 computed {sets_in(todo)} view sets in "
                  f"{elapsed:.1f} s ({world} rank(s))"
                  + (f"; rewrote {len(repaired)} damaged shard(s) {repaired}" if repaired else ""))
        if dist.is_initialized():
            dist.destroy_process_group()
        return {"out": str(out), "shards_done": done, "num_shards": layout.num_shards,
                "computed_view_sets": sets_in(todo), "seconds": elapsed, "repaired_shards": repaired}
    finally:
        lock.release()


def _load_teacher(cfg: RunConfig, spec: TeacherSpec, device: torch.device) -> Teacher:
    weights = Path(cfg.weights)
    if problem := file_problem(weights):
        raise RunError(f"teacher checkpoint {weights} {problem}")
    options = teacher_options(spec, solider_weights=cfg.solider_weights, semantic_weight=cfg.semantic_weight)
    return load_teacher(spec, weights, **options).to(device)


def _fit_coding(computer: TargetComputer, images: ImageFile, cfg: RunConfig,
                layout: StoreLayout) -> tuple[ShapeMaskCalibration, dict | None]:
    """Fit the shape mask (and a compact store's token basis, set on `computer`) on the calibration images,
    and measure the coding's fidelity on the first of them: (calibration, summarised figures). The figures
    (a student forward on the sample) are measured where knobs are chosen or a budget is set: for a compact
    store, or with --max-loss-change; the fixed float16 and int8 codings are measured by `verify`."""
    calibration, tokens, indices = computer.fit_calibration(images, num_images=layout.num_images,
                                                            count=cfg.calibration_images, seed=cfg.seed,
                                                            views_per_image=layout.views_per_image,
                                                            progress=cfg.progress and is_rank0())
    if layout.compact is not None:
        computer.compact = CompactCoding(layout.compact, TokenBasis.fit(tokens, layout.compact.token_rank))
    if layout.compact is None and cfg.max_loss_change is None:
        return calibration, None
    figures = computer.fidelity_sample(images, indices[:FIDELITY_VIEW_SETS], cfg.seed, layout.views_per_image,
                                       calibration, layout.target_format)
    return calibration, summarise(figures)


def _forget_damaged_shards(writer: StoreWriter, finished: list[int], progress: bool) -> list[int]:
    """Recheck finished shards against their markers' CRC32Cs; drop the markers of damaged ones (rewritten next)."""
    with ThreadPoolExecutor(4) as pool:  # CRC32C releases the GIL on large blocks; mostly I/O-bound anyway
        problems = list(tqdm(pool.map(writer.damaged_files, finished), total=len(finished), unit="shard",
                             desc="recheck finished shards", disable=not progress or not finished))
    damaged = [shard for shard, found in zip(finished, problems) if found]
    for shard, found in zip(finished, problems):
        for problem in found:
            print(f"{problem}; rewriting shard {shard}", file=sys.stderr)
    for shard in damaged:
        writer.forget(shard)
    return damaged


def _check_resumable(out: Path, stored: dict, identity: dict) -> None:
    """An existing store (attributes `stored`) may only be resumed by exactly the run that created it."""
    check_format_version(stored, out)
    check_spec_version(stored, out)
    problems = describe_differences(stored, identity, identity)
    if problems:
        raise RunError(f"{out} already holds a store made by a different run; refusing to mix targets: "
                       + "; ".join(problems) + ". Use another --out, or delete the old store.")


def _process_shards(todo: list[int], load, writer: StoreWriter, computer: TargetComputer,
                    calibration: ShapeMaskCalibration, target_format: str, progress) -> None:
    """The serial path: each batch rendered, then run through the teacher and copied back, one after the other;
    only the decoding of the next shard and the writing of the previous one run in background threads."""
    with progress, ThreadPoolExecutor(1) as writer_thread:
        pending_write = None
        for shard, shard_images, params in decoded_shards(todo, load):
            rows = computer.shard_rows(shard_images, params, calibration, target_format, progress)
            if pending_write is not None:
                pending_write.result()
            pending_write = writer_thread.submit(writer.write_shard, shard, rows)
        if pending_write is not None:
            pending_write.result()
