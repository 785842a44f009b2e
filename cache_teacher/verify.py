"""`verify` (is the store complete, intact and faithful?) and `info` (what does it hold, at what cost?)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from cache_teacher.fidelity import budget_problem, fidelity, figures_table, merge, student_probe, summarise
from cache_teacher.run import _format_bytes
from dpal.config import TeacherSpec
from dpal.recipes import TEACHERS
from dpal.shape_mask import ShapeMaskCalibration
from dpal.teachers import load_teacher
from formats.images import ImageFile, check_images, images_fingerprint
from formats.schema import VIEW_PARAMS_ARRAY
from formats.store import StoreError, file_sha256, integrity_problems, open_store, repair_hint
from formats.teacher_side import BackgroundPool, TeacherSide
from formats.view_records import image_view_params

# Stored-vs-recomputed limits per format: float16 rounding (and bf16 on CUDA, recomputed the same way)
# stays far inside them. int8 local tokens are judged in quantization steps (|stored - fresh| / row
# scale: 0.5 from rounding plus recompute noise); int8 relation rows (log-domain codes: rounding alone
# costs KL <= step^2 / 8 ~ 8e-4) by their KL. A compact store is compared with the fresh outputs coded again
# with its own basis and knobs (what it should hold), within the int8 limits; what its coding loses against
# the teacher is the fidelity table's, judged by the store's --max-loss-change.
THRESHOLDS = {
    "float16": {"min_cosine": 0.999, "max_relation_kl": 1e-3, "max_mask_abs": 0.02},
    "int8": {"min_cosine": 0.995, "max_relation_kl": 2e-3, "max_mask_abs": 0.02, "max_steps": 1.0},
    "compact": {"min_cosine": 0.995, "max_relation_kl": 2e-3, "max_mask_abs": 0.02},
}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def verify(store_path: str, weights: str | None, *, images: str | None = None, backgrounds: str | None = None,
           samples: int = 8, seed: int = 0, device: str | None = None, batch_size: int = 8,
           checksums_only: bool = False, teachers: dict[str, TeacherSpec] = TEACHERS) -> tuple[bool, list[dict]]:
    """Returns (passed, table rows); prints the table. `checksums_only`: completeness, store and image checksums and
    the images files' identity, without the teacher (no `weights` needed)."""
    store = open_store(store_path, require_complete=False, option="STORE")
    attrs = store.attrs
    problems = integrity_problems(store)
    print(f"integrity: {store.layout.num_shards - len(store.missing_shards())}/{store.layout.num_shards} shards "
          f"finished, checksums {'OK' if not problems else 'FAILED'}")
    for problem in problems[:20]:
        print(f"  {problem}")
    if problems:
        print(f"verify: FAILED; {repair_hint(store.path)}")
        return False, []
    images_path, backgrounds_path = images or attrs["images_path"], backgrounds or attrs["backgrounds_path"]
    for path, key in ((images_path, "images_fingerprint"), (backgrounds_path, "backgrounds_fingerprint")):
        check_images(path, progress=True)  # every image's bytes against its CRC32C from `pack`
        if images_fingerprint(path) != attrs[key]:
            raise StoreError(f"{path} is not the file the store was made from ({key} differs); pass the right file")
    if checksums_only:
        print("verify: checksums OK (store and images); the teacher was not re-run (--checksums-only)")
        return True, []
    if file_sha256(weights) != attrs["checkpoint_sha256"]:
        raise StoreError(f"{weights} is not the checkpoint the store was made with (sha256 differs)")
    spec = teachers[attrs["teacher"]] if attrs["teacher"] in teachers else TeacherSpec(**attrs["teacher_spec"])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    view_cfg = store.view_config  # parsed from the attributes once
    side = TeacherSide(load_teacher(spec, weights, **attrs["teacher_options"]).to(dev), BackgroundPool(backgrounds_path),
                       view_cfg, dev, batch_size)
    side.compact = store.compact  # a compact store's coding, to recode the fresh outputs as it should hold them
    image_file = ImageFile(images_path)
    calibration = ShapeMaskCalibration.from_dict(attrs["mask_calibration"])
    k = store.views_per_image
    picks = sorted(random.Random(seed).sample(range(store.num_images * k), min(samples, store.num_images * k)))
    stats: dict[str, list[float]] = {}
    probe, fidelity_parts = student_probe(spec), []
    for start in range(0, len(picks), batch_size):
        chunk = picks[start:start + batch_size]
        rows = [store.read_images(p // k, p // k + 1) for p in chunk]
        params = torch.stack([torch.from_numpy(r[VIEW_PARAMS_ARRAY][0, p % k]) for r, p in zip(rows, chunk)])
        resampled = torch.stack([image_view_params(attrs["seed"], p // k, k, attrs["num_backgrounds"],
                                                   view_cfg)[p % k] for p in chunk])
        stats.setdefault("view_params_equal", []).append(float(torch.equal(params, resampled)))
        views = side.render([torch.from_numpy(image_file.image(p // k)) for p in chunk], params)
        fresh = side.run_teacher(views.global_view, views.crowd)
        fresh_targets = side.float_targets(fresh, calibration)
        fresh_mask = fresh_targets.local_mask.cpu()
        coded_batch = store.targets({n: np.stack([v[0, p % k] for v, p in zip((r[n] for r in rows), chunk)])
                                     for n in rows[0]})
        fidelity_parts.append(fidelity(coded_batch, fresh_targets,
                                       {"global_view": views.global_view, "crowd_view": views.crowd}, probe))
        if store.compact is not None:  # what the store should hold: the fresh outputs in its own coding
            recoded = side.encode(fresh, calibration, "compact").decoded()
            fresh = fresh._replace(global_=recoded.global_target, local=recoded.local_target,
                                   relation=recoded.relation_target)
        for r, p, i in zip(rows, chunk, range(len(chunk))):
            coded = store.targets({n: v[0, p % k] for n, v in r.items()})
            stored = coded.decoded()
            new = {"global": fresh.global_[i].cpu(), "local": fresh.local[i].cpu(), "relation": fresh.relation[i].cpu()}
            stats.setdefault("global_cosine", []).append(float(_cosine(stored.global_target, new["global"])))
            stats.setdefault("global_max_abs", []).append(float((stored.global_target - new["global"]).abs().max()))
            stats.setdefault("local_cosine", []).append(float(_cosine(stored.local_target, new["local"]).min()))
            stats.setdefault("local_max_abs", []).append(float((stored.local_target - new["local"]).abs().max()))
            stats.setdefault("mask_max_abs", []).append(float((stored.local_mask - fresh_mask[i]).abs().max()))
            stats.setdefault("relation_max_abs", []).append(
                float((stored.relation_target - new["relation"]).abs().max()))
            # KL(stored || recomputed), rows renormalized: the stored relation is the target R_t of the
            # training loss KL(R_t || R_s), so this is the loss a perfect student would still pay.
            target = stored.relation_target / stored.relation_target.sum(-1, keepdim=True)
            kl = (target * (target.clamp_min(1e-30).log() - new["relation"].clamp_min(1e-30).log())).sum(-1)
            stats.setdefault("relation_kl", []).append(float(kl.max()))
            if store.target_format == "int8":
                scale = coded.local_scale.float().clamp_min(1e-30)[..., None]
                steps = ((stored.local_target - new["local"]).abs() / scale).max()
                stats.setdefault("local_error_steps", []).append(float(steps))
    limits = THRESHOLDS[store.target_format]
    checks = {"view_params_equal": ("min", 1.0), "global_cosine": ("min", limits["min_cosine"]),
              "local_cosine": ("min", limits["min_cosine"]), "mask_max_abs": ("max", limits["max_mask_abs"]),
              "relation_kl": ("max", limits["max_relation_kl"]),
              "local_error_steps": ("max", limits.get("max_steps"))}
    table, passed = [], True
    print(f"re-rendered {len(picks)} random view sets, teacher rerun on {dev}:")
    print(f"{'metric':<20}{'worst':>14}{'mean':>14}{'limit':>14}  result")
    for name, values in stats.items():
        kind, limit = checks.get(name, (None, None))
        worst = min(values) if kind == "min" else max(values)
        ok = limit is None or (worst >= limit if kind == "min" else worst <= limit)
        passed &= ok
        limit_text = "" if limit is None else f"{'>=' if kind == 'min' else '<='} {limit:g}"
        print(f"{name:<20}{worst:>14.6g}{np.mean(values):>14.6g}{limit_text:>14}  {'ok' if ok else 'FAIL'}")
        table.append({"metric": name, "worst": worst, "mean": float(np.mean(values)), "limit": limit, "ok": ok})
    summary = summarise(merge(fidelity_parts))
    problem = budget_problem(summary, attrs.get("max_loss_change"))
    passed &= problem is None
    print(f"fidelity of the stored coding against the teacher's float32 outputs on these view sets "
          f"(--max-loss-change {attrs.get('max_loss_change')}: {problem or 'within budget'}):\n"
          f"{figures_table(summary)}")
    table += [{"metric": f"fidelity_{name}", "worst": v["worst"], "mean": v["mean"], "limit": None, "ok": True}
              for name, v in summary.items()]
    print("verify: " + ("PASSED" if passed else "FAILED"))
    return passed, table


def info(store_path: str) -> dict:
    """Print what the store holds: identity, progress, and per array shape, bytes per view set and compression."""
    store = open_store(store_path, require_complete=False, option="STORE")
    attrs, layout = store.attrs, store.layout
    view_sets = layout.num_images * layout.views_per_image
    done = store.done_shards()
    print(f"store {store.path}")
    weights = f"weights {attrs['weights_file']}, " if "weights_file" in attrs else ""  # timm:NAME teachers
    print(f"  teacher {attrs['teacher']} ({weights}checkpoint sha256 {attrs['checkpoint_sha256'][:16]}..., precision "
          f"{attrs.get('teacher_precision')}), format {attrs['target_format']} ({attrs.get('codec')}), "
          f"store format v{attrs['format_version']}, "
          f"spec v{attrs['spec_version']}, view params v{attrs['view_params_version']}")
    print(f"  {layout.num_images} images x K={layout.views_per_image} = {view_sets} view sets, token grid "
          f"{attrs['token_grid']}, {layout.crowd_tokens} crowd tokens, seed {attrs['seed']}")
    print(f"  chunks of {layout.chunk_images} images, {len(done)}/{layout.num_shards} shards of {layout.shard_images} "
          f"images finished; images {attrs.get('images_path')} ({attrs['num_backgrounds']} backgrounds from "
          f"{attrs.get('backgrounds_path')})")
    rows, total_raw, total_stored = [], 0, 0
    print(f"  {'array':<15}{'shape':<24}{'dtype':<9}{'raw B/view set':>15}{'stored B/view set':>19}{'ratio':>8}")
    for name, array in store.arrays.items():
        raw_per_set = int(np.prod(array.shape[2:])) * array.dtype.itemsize
        stored = sum(f.stat().st_size for f in (store.path / name).rglob("*") if f.is_file() and f.name != "zarr.json")
        written_sets = sum(np.subtract(*layout.shard_range(s)[::-1]) for s in done) * layout.views_per_image
        stored_per_set = stored / written_sets if written_sets else float("nan")
        ratio = raw_per_set / stored_per_set if written_sets else float("nan")
        total_raw += raw_per_set
        total_stored += stored_per_set if written_sets else 0
        print(f"  {name:<15}{str(tuple(array.shape)):<24}{str(array.dtype):<9}{raw_per_set:>15,}"
              f"{stored_per_set:>19,.0f}{ratio:>8.3f}")
        rows.append({"array": name, "shape": list(array.shape), "dtype": str(array.dtype),
                     "raw_bytes_per_view_set": raw_per_set, "stored_bytes_per_view_set": stored_per_set,
                     "compression_ratio": ratio})
    ratio = total_raw / total_stored if total_stored else float("nan")
    print(f"  {'all':<15}{'':<24}{'':<9}{total_raw:>15,}{total_stored:>19,.0f}{ratio:>8.3f}")
    print(f"  on disk: {_format_bytes(sum(f.stat().st_size for f in Path(store.path).rglob('*') if f.is_file()))}")
    if store.compact is not None:
        knobs = layout.compact
        print(f"  compact knobs: token rank {knobs.token_rank} of {layout.width} in {knobs.token_bits} bits, relation "
              f"k {knobs.relation_k} of {layout.crowd_tokens} in {knobs.relation_bits} bits")
    summary = attrs.get("fidelity")
    if summary:
        print(f"  fidelity recorded at creation, calibration sample (--max-loss-change "
              f"{attrs.get('max_loss_change')}):\n{figures_table(summary, indent='    ')}")
    else:
        print("  fidelity: none recorded at creation (a float16 or int8 store made without --max-loss-change); "
              "`verify` measures it")
    return {"fidelity": summary, "compact": layout.compact.to_dict() if layout.compact else None,
            "arrays": rows, "raw_bytes_per_view_set": total_raw, "stored_bytes_per_view_set": total_stored,
            "compression_ratio": ratio, "shards_done": len(done), "num_shards": layout.num_shards}
