"""View rendering tools: a speed benchmark and a picture of what teacher and student see.

  python -m cache_teacher.views_cli bench [--batch 256] [--devices cpu,cuda] [--json bench.json]
  python -m cache_teacher.views_cli bench --count-ops [8,64,256] [--json ops.json]
  python -m cache_teacher.views_cli grid --images PERSONS --backgrounds BACKGROUNDS --out views.png

PERSONS / BACKGROUNDS: an FFCV images file (.beton, from ``python -m cache_teacher pack``), a folder of
JPEG/PNG images, or a single image file.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dpal.config import ViewConfig
from formats.cli import POSITIVE, SEED, device_name, output_file
from formats.runtime import startup
from dpal.views import (background_indices, denormalize, render_local_crops, render_view_sets,
                        sample_local_crops, sample_view_sets, to_rgb_uint8)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def device_list(text: str) -> str:
    """argparse `type=` for --devices: comma-separated devices, each one that exists here."""
    for name in text.split(","):
        device_name(name)
    return text


def batch_list(text: str) -> list[int]:
    """argparse `type=` for --count-ops: comma-separated batch sizes, each >= 1."""
    return [POSITIVE(part) for part in text.split(",")]


class ImageSourceError(ValueError):
    """An image source that cannot be read: the message names the path and what is wrong."""


# ---------------------------------------------------------------------------------------- sources

class ImageSource:
    """Random access to decoded RGB uint8 images from a .beton, a folder or a single image file."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        if not self.path.exists():
            raise ImageSourceError(f"{what} {self.path} does not exist")
        if self.path.suffix == ".beton":
            from formats.images import ImageFile  # FFCV is only needed for .beton sources

            self._file = ImageFile(self.path)
            self._files = None
            count = len(self._file)
        else:
            self._file = None
            if self.path.is_dir():
                self._files = sorted(p for p in self.path.rglob("*")
                                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            else:
                self._files = [self.path]
            count = len(self._files)
        if count == 0:
            raise ImageSourceError(f"{what} {self.path} holds no images (looked for .beton or "
                                   f"{sorted(IMAGE_SUFFIXES)} files): the pool is empty")
        self.count = count

    def __len__(self) -> int:
        return self.count

    def image(self, index: int) -> torch.Tensor:
        if self._file is not None:
            return to_rgb_uint8(self._file.image(index))
        path = self._files[index]
        try:
            with Image.open(path) as img:
                img.load()
                pixels = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB", "RGBA") else img)
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ImageSourceError(f"{self.what} image {path} could not be decoded ({error}); "
                                   f"remove or replace the file") from None
        return to_rgb_uint8(pixels)


# ------------------------------------------------------------------------------------------ grid

def _to_uint8_hwc(view: torch.Tensor, cfg: ViewConfig) -> np.ndarray:
    return (denormalize(view.cpu(), cfg) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


# (label, who sees it) of the grid's columns
GRID_COLUMNS = (("source image", ""), ("global view", "teacher + student"), ("local crops", "student only"),
                ("crowd view", "teacher + student"))


def grid(args: argparse.Namespace) -> None:
    cfg = ViewConfig()
    persons, backgrounds = ImageSource(args.images, "--images"), ImageSource(args.backgrounds, "--backgrounds")
    generator = torch.Generator().manual_seed(args.seed)
    count = min(args.num, len(persons))
    chosen = torch.randperm(len(persons), generator=generator)[:count].tolist()
    images = [persons.image(i) for i in chosen]
    records = sample_view_sets(generator, count, num_backgrounds=len(backgrounds), cfg=cfg)
    pool = [backgrounds.image(i) for i in background_indices(records).tolist()]
    views = render_view_sets(images, pool, records, cfg)
    local_crops = render_local_crops(images, sample_local_crops(generator, count, cfg), cfg)

    # One row per view set: source (fitted to the view height) | global | local crops | crowd; labelled on top.
    gap, height = 6, cfg.crowd_size[0]
    table = []
    for i in range(count):
        source = Image.fromarray(images[i].numpy())
        source = np.asarray(source.resize((max(1, round(source.width * height / source.height)), height),
                                          Image.Resampling.BICUBIC))
        stacked = np.full((height, cfg.local_size[1], 3), 255, np.uint8)
        for j in range(min(cfg.num_local, height // cfg.local_size[0])):
            stacked[j * cfg.local_size[0]:(j + 1) * cfg.local_size[0]] = _to_uint8_hwc(local_crops[i, j], cfg)
        table.append([source, _to_uint8_hwc(views.global_view[i], cfg), stacked, _to_uint8_hwc(views.crowd[i], cfg)])
    widths = [max(row[column].shape[1] for row in table) for column in range(4)]
    width = sum(widths) + gap * 3
    header = Image.new("RGB", (width, 30), "white")
    draw, x = ImageDraw.Draw(header), 0
    for column, (name, seen_by) in enumerate(GRID_COLUMNS):
        draw.text((x + 2, 2), name, fill="black")
        draw.text((x + 2, 15), seen_by, fill="dimgray")
        x += widths[column] + gap
    rows = [np.asarray(header)]
    for tiles in table:
        row = []
        for tile, column_width in zip(tiles, widths):
            row += [np.pad(tile, ((0, 0), (0, column_width - tile.shape[1]), (0, 0)), constant_values=255),
                    np.full((height, gap, 3), 255, np.uint8)]
        rows += [np.concatenate(row[:-1], axis=1), np.full((gap, width, 3), 255, np.uint8)]
    out = Path(args.out)
    Image.fromarray(np.concatenate(rows[:-1], axis=0)).save(out)
    print(f"wrote {out}: {count} view sets, columns = source image | global view (teacher + student) | "
          f"{cfg.num_local} local crops (student) | crowd view (teacher + student)")


# ----------------------------------------------------------------------------------------- bench

def _synthetic_pool(generator: torch.Generator, count: int, heights: tuple[int, int],
                    aspects: tuple[float, float]) -> list[torch.Tensor]:
    """Random-content images of realistic sizes (rendering cost depends on sizes, not content)."""
    pool = []
    for _ in range(count):
        h = int(torch.randint(heights[0], heights[1] + 1, (1,), generator=generator))
        aspect = aspects[0] + float(torch.rand(1, generator=generator)) * (aspects[1] - aspects[0])
        pool.append(torch.randint(0, 256, (h, max(8, round(h * aspect)), 3), dtype=torch.uint8, generator=generator))
    return pool


def _timed(fn, device: torch.device, repeats: int, cpu_seconds: list | None = None) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (after one warm-up).

    ``cpu_seconds`` receives the median process CPU time: on a shared machine wall time also counts
    other processes, CPU time does not.
    """
    fn()
    times, cpu_times = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if cpu_seconds is not None:
        cpu_seconds.append(float(np.median(cpu_times)))
    return float(np.median(times))


def _student_step_seconds(views, local_crops, device: torch.device, repeats: int) -> float:
    """Forward + backward of the ViT-Ti student on the same views (global, crowd, local crops), bf16 autocast."""
    from dpal.recipes import get_recipe
    from dpal.students import build_student

    student = build_student(get_recipe("path-b_vit-ti")).to(device)
    crops = local_crops.flatten(0, 1)

    def step():
        student.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = sum(out.patches.float().mean() + out.cls.float().mean()
                       for out in (student(views.global_view), student(views.crowd), student(crops)))
        loss.backward()

    return _timed(step, device, repeats)


# Operators that launch no kernel: views and bare allocations.
_NO_KERNEL_OPS = {"aten._unsafe_view", "aten._reshape_alias", "aten.alias", "aten.detach", "aten.lift_fresh",
                  "aten.empty", "aten.empty_like", "aten.empty_strided"}


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators a render dispatches (after composite ops are decomposed), split into those
    touching a tensor on ``device`` (one kernel launch or copy each, on a GPU) and host-only ones."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.device_ops, self.host_ops = device, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if func.is_view or name in _NO_KERNEL_OPS:
            return out
        if any(isinstance(t, torch.Tensor) and t.device.type == self.device.type
               for t in tree_leaves((args, kwargs, out))):
            self.device_ops[name] = self.device_ops.get(name, 0) + 1
        else:
            self.host_ops += 1
        return out


def _cuda_launches(fn) -> int:
    """Kernels, copies and memsets the CUDA profiler sees during ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


# Profiled operators that launch nothing on a GPU although they have a kernel: allocations, a view that
# is not declared as one, and the wrapping of a Python number into a CPU scalar (an elementwise kernel takes
# it as an argument).
_NO_LAUNCH_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::_unsafe_view", "aten::scalar_tensor",
                  "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg"}


@functools.lru_cache(maxsize=None)
def _launches(name: str) -> bool:
    """Whether profiled operator ``name`` does device work itself: a kernel of its own (CPU or composite
    explicit), not a view and not a composite that only calls other operators."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None or name in _NO_LAUNCH_OPS:
        return False
    overloads = [getattr(packet, overload) for overload in packet.overloads()]
    if any(op.is_view for op in overloads):
        return False
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key)
               for op in overloads for key in ("CPU", "CompositeExplicitAutograd"))


def profiled_launches(fn) -> int:
    """Operator launches of ``fn()`` run on the CPU, counted with the torch profiler: every aten operator with a
    kernel of its own (`_launches`) that is not called from inside another such operator (a composite like
    ``matmul`` counts through the ``bmm`` and copies it calls). Each would be one kernel or copy on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        if not _launches(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not _launches(parent.name):
            parent = parent.cpu_parent
        count += parent is None
    return count


def views_at_commit(commit: str):
    """dpal/views.py as it was at git ``commit`` of this checkout, loaded as a module (with today's dpal.config):
    the `--count-ops --against` baseline. Raises ValueError when git or the commit is not there."""
    import subprocess
    import types

    root = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(["git", "-C", str(root), "show", f"{commit}:dpal/views.py"], capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise ValueError(f"cannot read dpal/views.py at commit {commit} (needs git and this checkout's history): "
                         f"{error}") from None
    module = types.ModuleType(f"views_at_{commit[:12]}")
    exec(compile(source, f"dpal/views.py@{commit[:12]}", "exec"), module.__dict__)
    return module


def count_ops(batches: list[int], devices: list[torch.device], seed: int, views=None) -> list[dict]:
    """Operators per render call (view sets; local crops) for each batch size, images already on the device.

    The ``meta`` device stands in for a GPU on any machine: a meta tensor holds no data, so every operator
    that touches one is device work (a kernel or a copy on CUDA), and everything else is host work. On the
    CPU the device half of each call (``execute_*`` on a plan made beforehand) is also run under the torch
    profiler (`profiled_launches`). ``views`` is the rendering module (default dpal.views; pass another
    version's, e.g. `views_at_commit`, to compare).
    """
    import dpal.views

    views = views or dpal.views
    cfg, rows = ViewConfig(), []
    for batch in batches:
        generator = torch.Generator().manual_seed(seed)
        images = _synthetic_pool(generator, batch, (128, 384), (0.35, 0.65))
        pool = _synthetic_pool(generator, min(64, batch), (256, 512), (0.75, 1.5))
        # Records of the module's own version (their layout changes with it).
        records = views.sample_view_sets(generator, batch, num_backgrounds=len(pool), cfg=cfg)
        local_records = views.sample_local_crops(generator, batch, cfg)
        chosen = [pool[i] for i in views.background_indices(records).tolist()]
        for device in devices:
            on_device = [image.to(device) for image in images]  # as the trainer holds them
            backgrounds = [image.to(device) for image in chosen]
            calls = {"view_sets": lambda: views.render_view_sets(on_device, backgrounds, records, cfg, device),
                     "local_crops": lambda: views.render_local_crops(on_device, local_records, cfg, device)}
            for call, fn in calls.items():
                fn()  # warm-up: device constants are cached on first use
                with _OpCounter(device) as counter:
                    fn()
                row = {"device": str(device), "batch": batch, "call": call,
                       "device_ops": sum(counter.device_ops.values()), "host_ops": counter.host_ops,
                       "device_ops_by_name": dict(sorted(counter.device_ops.items(), key=lambda kv: -kv[1]))}
                if device.type == "cuda":
                    row["cuda_launches"] = _cuda_launches(fn)
                rows.append(row)
        if not hasattr(views, "plan_view_sets"):  # a version from before the plan / execute split
            continue
        packed = views.pack_images(images + chosen)
        plans = {"view_sets": (views.execute_view_sets,
                               views.plan_view_sets(packed.select(0, batch), packed.select(batch, 2 * batch), records,
                                                    cfg)),
                 "local_crops": (views.execute_local_crops,
                                 views.plan_local_crops(packed.select(0, batch), local_records, cfg))}
        for call, (execute, plan) in plans.items():
            execute(packed.pixels, plan)  # warm-up
            rows.append({"device": "cpu", "batch": batch, "call": call,
                         "profiled_launches": profiled_launches(lambda: execute(packed.pixels, plan))})
    return rows


def _print_count_ops(rows: list[dict], baseline: str | None) -> None:
    print("operators per render call, images already on the device (device ops: one kernel or copy each "
          "on a GPU; meta = a stand-in device that runs no kernels; cpu = the device half of the call, "
          "execute_* on a ready plan, counted by the torch profiler)" + (f"; views of commit {baseline}"
                                                                           if baseline else ""))
    print(f"{'device':<8}{'batch':>6}  {'call':<12}{'device ops':>11}{'host ops':>10}{'profiled':>10}"
          f"{'cuda launches':>15}")
    for row in rows:
        print(f"{row['device']:<8}{row['batch']:>6}  {row['call']:<12}{row.get('device_ops', '-'):>11}"
              f"{row.get('host_ops', '-'):>10}{row.get('profiled_launches', '-'):>10}"
              f"{row.get('cuda_launches', '-'):>15}")


def bench(args: argparse.Namespace) -> None:
    if args.count_ops:
        devices = [torch.device("meta")] + [torch.device(name) for name in args.devices.split(",")
                                            if name.startswith("cuda") and torch.cuda.is_available()]
        views = views_at_commit(args.against) if args.against else None
        rows = count_ops(args.count_ops, devices, args.seed, views)
        _print_count_ops(rows, args.against)
        if args.json:
            Path(args.json).write_text(json.dumps({"benchmark": "dpal.views operators per render call",
                                                   "torch": torch.__version__, "views_commit": args.against,
                                                   "results": rows}, indent=2))
            print(f"wrote {args.json}")
        return
    cfg = ViewConfig()
    generator = torch.Generator().manual_seed(args.seed)
    if args.images:
        persons, backgrounds = ImageSource(args.images, "--images"), ImageSource(args.backgrounds, "--backgrounds")
        images = [persons.image(i % len(persons)) for i in range(args.batch)]
        pool = [backgrounds.image(i) for i in range(min(len(backgrounds), args.batch))]
        source = f"{args.images} + {args.backgrounds}"
    else:
        images = _synthetic_pool(generator, args.batch, (128, 384), (0.35, 0.65))  # LUPerson-like crops
        pool = _synthetic_pool(generator, min(64, args.batch), (256, 512), (0.75, 1.5))
        source = "synthetic: persons 128-384 px high (w/h 0.35-0.65), backgrounds 256-512 px (w/h 0.75-1.5)"
    records = sample_view_sets(generator, args.batch, num_backgrounds=len(pool), cfg=cfg)
    local_records = sample_local_crops(generator, args.batch, cfg)
    chosen = [pool[i] for i in background_indices(records).tolist()]

    results = []
    for name in args.devices.split(","):
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"skipping {name}: no CUDA device", file=sys.stderr)
            continue
        row = {"device": name, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "load_average_1min": os.getloadavg()[0], "batch": args.batch}
        cpu_seconds = []
        row["view_sets_s"] = _timed(lambda: render_view_sets(images, chosen, records, cfg, device), device,
                                    args.repeats, cpu_seconds)
        row["local_crops_s"] = _timed(lambda: render_local_crops(images, local_records, cfg, device), device,
                                      args.repeats, cpu_seconds)
        row["total_s"] = row["view_sets_s"] + row["local_crops_s"]
        row["total_process_cpu_s"] = sum(cpu_seconds)
        row["view_sets_per_s"] = args.batch / row["total_s"]
        if args.student_step == "on" or (args.student_step == "auto" and device.type == "cuda"):
            views = render_view_sets(images, chosen, records, cfg, device)
            crops = render_local_crops(images, local_records, cfg, device)
            row["student_step_s"] = _student_step_seconds(views, crops, device, args.repeats)
            row["render_fraction_of_student_step"] = row["total_s"] / row["student_step_s"]
        results.append(row)

    header = f"{'device':<8}{'batch':>6}{'global+crowd ms':>17}{'2 local ms':>12}{'total ms':>10}{'view sets/s':>13}"
    header += f"{'student step ms':>17}{'render/step':>13}"
    print(f"rendering views (each view set = global 256x128 + crowd 256x256 + {cfg.num_local} local 128x96); "
          f"median of {args.repeats}; images: {source}")
    print(header)
    for row in results:
        step = row.get("student_step_s")
        line = (f"{row['device']:<8}{row['batch']:>6}{row['view_sets_s'] * 1e3:>17.1f}"
                f"{row['local_crops_s'] * 1e3:>12.1f}{row['total_s'] * 1e3:>10.1f}{row['view_sets_per_s']:>13.1f}")
        if step:
            line += f"{step * 1e3:>17.1f}{row['render_fraction_of_student_step']:>13.1%}"
        else:
            line += f"{'-':>17}{'-':>13}"
        print(line)
    if args.json:
        report = {"benchmark": "dpal.views render", "torch": torch.__version__, "images": source,
                  "repeats": args.repeats, "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cache_teacher.views_cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    b = commands.add_parser("bench", help="views per second of render_view_sets + render_local_crops",
                            description="Time one training batch of views: render_view_sets (global + crowd) "
                            "and render_local_crops (2 per image), per device; print a table, optionally JSON. "
                            "On CUDA it also times a ViT-Ti student forward+backward on the same views, the "
                            "step the rendering must stay well under (target: < 10%).")
    b.add_argument("--batch", type=POSITIVE, default=256, help="view sets per batch (>= 1, default 256, the recipe's)")
    default_devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    b.add_argument("--devices", type=device_list, default=default_devices, help=f"comma-separated (default {default_devices})")
    b.add_argument("--repeats", type=POSITIVE, default=3, help="timed runs per measurement, after one warm-up (>= 1)")
    b.add_argument("--images", help="person images to render instead of synthetic ones (.beton / folder)")
    b.add_argument("--backgrounds", help="background pool for --images")
    b.add_argument("--student-step", choices=("auto", "on", "off"), default="auto",
                   help="also time a ViT-Ti student forward+backward (auto: on CUDA only)")
    b.add_argument("--count-ops", nargs="?", type=batch_list, const="8,64,256", metavar="BATCHES",
                   help="instead of timing, count the operators of each render call for these batch sizes "
                   "(default 8,64,256): device ops (kernel launches or copies on a GPU; counted on the meta "
                   "device, plus CUDA when --devices has it) and host ops")
    b.add_argument("--against", metavar="COMMIT",
                   help="with --count-ops: count dpal/views.py as it was at this git commit instead (the "
                   "baseline of a before/after comparison; needs this checkout's git history)")
    b.add_argument("--seed", type=SEED, default=0)
    b.add_argument("--json", type=output_file, help="write the results here as JSON (its folder must exist)")

    g = commands.add_parser("grid", help="PNG grid of view sets: source, global, local crops, crowd",
                            description="Render a few view sets exactly as the cache does and save them "
                            "de-normalized side by side: source image | global view | local crops | crowd view.")
    g.add_argument("--images", required=True, help="person images: .beton, folder or image file")
    g.add_argument("--backgrounds", required=True, help="background pool: .beton, folder or image file")
    g.add_argument("--num", type=POSITIVE, default=6, help="view sets to show (>= 1, default 6)")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--out", type=output_file, default="views.png", help="PNG to write (default views.png)")

    args = parser.parse_args(argv)
    startup()
    if args.command == "bench" and bool(args.images) != bool(args.backgrounds):
        parser.error("bench: give both --images and --backgrounds, or neither (synthetic images)")
    if args.command == "bench" and args.against and not args.count_ops:
        parser.error("bench: --against COMMIT goes with --count-ops")
    try:
        (bench if args.command == "bench" else grid)(args)
    except (ImageSourceError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
