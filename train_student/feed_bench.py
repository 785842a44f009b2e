"""`python -m train_student feed-bench`: how fast the target feed reads each store, per target format.

For each store given, the trainer's target feed (`data.TargetPrefetcher`: block reads, CRC32C checks, Blosc
decompression, batch assembly, background lookup) is walked for a number of batches, and then each batch
is staged as the step receives it (`step.CachedTargets.stage`: copied to the device and, for a compact
store, decoded there). Reported per store: samples per second of the feed alone and of the feed with the
staging, the bytes read from disk per second (the store's stored bytes per view set times the feed's
rate) and the uncompressed bytes per view set. The store's files are read through the page cache, so a
second run measures the CPU side of the feed; the bandwidth a real dataset needs from its storage is
`cache_teacher run --dry-run`'s table. Prints a table and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from runtime.arguments import NON_NEGATIVE, POSITIVE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train_student feed-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, action="append", metavar="STORE.zarr",
                   help="target store from `cache_teacher run` (repeat to compare formats)")
    p.add_argument("--backgrounds", required=True, metavar="BG.beton",
                   help="the background pool the stores were cached with")
    p.add_argument("--batch-size", type=POSITIVE, default=64, metavar="N", help="samples per batch (>= 1, default 64)")
    p.add_argument("--batches", type=POSITIVE, default=50, metavar="N", help="timed batches per store (>= 1, "
                   "default 50)")
    p.add_argument("--warmup-batches", type=NON_NEGATIVE, default=3, metavar="N",
                   help="untimed batches first (>= 0, default 3)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where batches are staged and compact targets decoded (auto: CUDA when visible)")
    p.add_argument("--json", dest="json_out", default="feed_bench.json", metavar="PATH",
                   help="where to write the figures (default feed_bench.json)")
    return p


def stored_bytes_per_view_set(store) -> float:
    """Bytes on disk per view set across the store's arrays (its compressed shard files)."""
    files = sum(f.stat().st_size for name in store.arrays for f in (store.path / name).rglob("*")
                if f.is_file() and f.name != "zarr.json")
    return files / (store.num_images * store.views_per_image)


def _batches(store, backgrounds, batch_size: int, count: int):
    """`count` batches of the trainer's target feed, walking epochs as needed."""
    from train_student.data import FeedPlan, TargetPrefetcher

    batch_size = min(batch_size, store.num_images)
    plan = FeedPlan(num_images=store.num_images, chunk_images=store.chunk_images, micro_batch=batch_size,
                    world_size=1, rank=0, accum_steps=1, seed=0, window_images=1024)
    epoch = 0
    while count > 0:
        feed = TargetPrefetcher(store, plan, store.view_config, backgrounds, epoch, 0, pin=False)
        try:
            while count > 0 and (item := feed.get()) is not None:
                count -= 1
                yield item
        finally:
            feed.close()
        epoch += 1


def measure(store_path: str, backgrounds_path: str, *, batch_size: int, batches: int, warmup: int, device) -> dict:
    import torch

    from formats.store import open_store
    from formats.teacher_side import BackgroundPool
    from train_student.data import FeedBatch
    from train_student.step import CachedTargets

    store, backgrounds = open_store(store_path), BackgroundPool(backgrounds_path)
    source, timings = CachedTargets(), {}
    for staging in (False, True):  # the feed alone, then the feed with each batch staged as the step gets it
        items = _batches(store, backgrounds, batch_size, warmup + batches)
        for _ in range(warmup):
            next(items)
        start, samples = time.perf_counter(), 0
        for item in items:
            samples += len(item["indices"])
            if staging:
                staged = source.stage(FeedBatch(item["indices"], [], item["backgrounds"], item["view_params"],
                                                item["local_params"], item["targets"]), device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[staging] = samples / (time.perf_counter() - start)
    per_set = stored_bytes_per_view_set(store)
    rate = timings[False]
    return {"store": str(store.path), "format": store.target_format,
            "knobs": store.layout.compact.to_dict() if store.layout.compact else None,
            "raw_bytes_per_view_set": sum(store.layout.bytes_per_view_set().values()),
            "stored_bytes_per_view_set": per_set, "samples": samples, "feed_samples_per_s": rate,
            "feed_bytes_per_s": rate * per_set, "feed_and_stage_samples_per_s": timings[True],
            "staged_arrays": sorted(staged)}


def main(argv=None) -> int:
    from runtime.cli import exit_status

    args = parser().parse_args(argv)

    def work():
        import torch

        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                              else "cpu")
        rows = [measure(path, args.backgrounds, batch_size=args.batch_size, batches=args.batches,
                        warmup=args.warmup_batches, device=device) for path in args.store]
        print(f"train_student feed-bench: batch {args.batch_size}, {args.batches} batches, staged on {device}")
        print(f"{'format':<9}{'raw B/set':>11}{'disk B/set':>12}{'feed samples/s':>16}{'feed MB/s':>11}"
              f"{'+ stage samples/s':>19}  store")
        for r in rows:
            print(f"{r['format']:<9}{r['raw_bytes_per_view_set']:>11,}{r['stored_bytes_per_view_set']:>12,.0f}"
                  f"{r['feed_samples_per_s']:>16,.0f}{r['feed_bytes_per_s'] / 1e6:>11,.1f}"
                  f"{r['feed_and_stage_samples_per_s']:>19,.0f}  {r['store']}")
        Path(args.json_out).write_text(json.dumps({"device": str(device), "batch_size": args.batch_size,
                                                   "rows": rows}, indent=1))
        print(f"wrote {args.json_out}")

    return exit_status(work)
