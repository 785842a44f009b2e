"""`python -m cache_teacher views`: a picture of what teacher and student see (`grid`), and the speed of the
render calls (`bench`).

Image sources (--images / --backgrounds): an FFCV images file (.beton, from `python -m cache_teacher pack`), a
folder of JPEG/PNG images, or a single image file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from dpal.config import ViewConfig
from dpal.errors import UserError
from dpal.views import (background_indices, denormalize, render_local_crops, render_view_sets, sample_local_crops,
                        sample_view_sets, to_rgb_uint8)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class ImageSourceError(UserError):
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
    used = {index: backgrounds.image(index) for index in background_indices(records).tolist()}
    views = render_view_sets(images, used, records, cfg)
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


def bench(args: argparse.Namespace) -> None:
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

    results = []
    for name in (args.devices or ("cpu,cuda" if torch.cuda.is_available() else "cpu")).split(","):
        device = torch.device(name)
        row = {"device": name, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "load_average_1min": os.getloadavg()[0], "batch": args.batch}
        cpu_seconds = []
        row["view_sets_s"] = _timed(lambda: render_view_sets(images, pool, records, cfg, device), device,
                                    args.repeats, cpu_seconds)
        row["local_crops_s"] = _timed(lambda: render_local_crops(images, local_records, cfg, device), device,
                                      args.repeats, cpu_seconds)
        row["total_s"] = row["view_sets_s"] + row["local_crops_s"]
        row["total_process_cpu_s"] = sum(cpu_seconds)
        row["view_sets_per_s"] = args.batch / row["total_s"]
        if args.student_step == "on" or (args.student_step == "auto" and device.type == "cuda"):
            views = render_view_sets(images, pool, records, cfg, device)
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
