"""`python -m cache_teacher pack SRC_DIR OUT.beton`: a folder tree of JPEG/PNG images -> FFCV images file.

JPEGs that libjpeg-turbo decodes, in RGB or grey, and within ``--max-side`` are stored byte for byte
(no generation loss, no encode time); everything else (PNG, RGBA/palette/CMYK, oversized) is
converted to RGB, shrunk to ``--max-side`` (area interpolation) and encoded once as JPEG.
Two passes: a parallel scan that fully decodes every file (so a corrupt file is found and skipped
here, never at training time), then FFCV's writer. Next to OUT.beton:
  OUT.beton.manifest.tsv  index -> source path (relative to SRC_DIR), size, how it was stored;
  OUT.beton.skipped.tsv   every unreadable file with the reason.
The .beton appears only when complete (written under a temporary name, then renamed).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from cache_teacher.ffcv_images import decode_jpeg, image_fields
from cache_teacher.options import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_SIDE
from dpal.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class PackError(UserError):
    """Bad input to `pack`: the message names the path and what to do."""


@dataclass(frozen=True)
class ScannedImage:
    path: str  # relative to the source folder, '/'-separated
    height: int
    width: int
    kept: bool  # True: original JPEG bytes stored as-is


def find_images(src: Path) -> list[Path]:
    if not src.is_dir():
        raise PackError(f"source folder {src} does not exist or is not a folder")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise PackError(f"source folder {src} holds no JPEG/PNG images (looked for {sorted(IMAGE_SUFFIXES)})")
    return files


def _keepable_jpeg(path: Path, max_side: int) -> tuple[np.ndarray, int, int] | None:
    """The file's bytes and size if they can be stored untouched, else None."""
    with Image.open(path) as img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or max(img.size) > max_side:
            return None
        width, height = img.size
    data = np.fromfile(path, dtype=np.uint8)
    return (data, height, width) if decode_jpeg(data, height, width) is not None else None


def _reencoded(path: Path, max_side: int, quality: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] JPEG bytes of any readable image, max side bounded."""
    with Image.open(path) as img:
        img.load()  # full decode: truncated or corrupt files raise here
        rgb = np.asarray(img.convert("RGB"))  # grey, palette, CMYK, alpha (dropped) -> RGB
    scale = max_side / max(rgb.shape[:2])
    if scale < 1:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError("JPEG encoding failed")
    return encoded.reshape(-1)


def prepare_image(path: Path, max_side: int, quality: int) -> tuple[np.ndarray, int, int, bool]:
    """(jpeg bytes, height, width, kept) for one file; raises on unreadable input. Deterministic."""
    kept = _keepable_jpeg(path, max_side)
    if kept is not None:
        return (*kept, True)
    jpeg = _reencoded(path, max_side, quality)
    with Image.open(io.BytesIO(jpeg.tobytes())) as img:
        width, height = img.size
    if decode_jpeg(jpeg, height, width) is None:
        raise OSError("re-encoded JPEG does not decode")
    return jpeg, height, width, False


def _scan_one(args) -> tuple[str, ScannedImage | None, str]:
    path, rel, max_side, quality = args
    try:
        _, height, width, kept = prepare_image(path, max_side, quality)
        return rel, ScannedImage(rel, height, width, kept), ""
    except (OSError, ValueError, SyntaxError, EOFError, cv2.error, Image.DecompressionBombError) as exc:
        # what PIL / OpenCV raise for unreadable files: skip and report, never abort the pack
        return rel, None, f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\t", " ")


class _PackedImages:
    """Indexed dataset for FFCV's writer over the scanned, readable files."""

    def __init__(self, src: Path, scanned: list[ScannedImage], max_side: int, quality: int):
        self.src, self.scanned, self.max_side, self.quality = src, scanned, max_side, quality

    def __len__(self) -> int:
        return len(self.scanned)

    def __getitem__(self, index: int):
        item = self.scanned[index]
        path = self.src / item.path
        if item.kept:
            jpeg = np.fromfile(path, dtype=np.uint8)
        else:
            jpeg = _reencoded(path, self.max_side, self.quality)
        return jpeg, item.height, item.width


def _check_output(out: Path) -> None:
    parent = out.resolve().parent
    if not parent.is_dir():
        raise PackError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise PackError(f"output folder {parent} is not writable")
    if out.suffix != ".beton":
        raise PackError(f"output {out} should end in .beton")


def pack(src: str | os.PathLike, out: str | os.PathLike, *, max_side: int = DEFAULT_MAX_SIDE,
         quality: int = DEFAULT_JPEG_QUALITY, workers: int | None = None, progress: bool = True) -> dict:
    """Pack ``src`` into ``out``; returns a summary dict (packed, kept, reencoded, skipped, paths)."""
    from ffcv.writer import DatasetWriter

    src, out = Path(src), Path(out)
    if max_side < 16:
        raise PackError(f"--max-side {max_side} is too small (use >= 16; default {DEFAULT_MAX_SIDE})")
    _check_output(out)
    files = find_images(src)
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(path, path.relative_to(src).as_posix(), max_side, quality) for path in files]
    scanned, skipped = [], []
    with mp.get_context("fork").Pool(workers) as pool:
        for rel, item, reason in tqdm(pool.imap(_scan_one, jobs, chunksize=16), total=len(jobs), unit="img",
                                      desc=f"scan {src.name}", disable=not progress):
            (scanned.append(item) if item is not None else skipped.append((rel, reason)))

    report = out.with_name(out.name + ".skipped.tsv")
    manifest = out.with_name(out.name + ".manifest.tsv")
    with open(report, "w") as handle:
        handle.write("source_path\treason\n")
        handle.writelines(f"{rel}\t{reason}\n" for rel, reason in skipped)
    if not scanned:
        raise PackError(f"none of the {len(files)} images under {src} could be read; see {report}")

    partial = out.with_name(out.name + ".partial")
    writer = DatasetWriter(str(partial), image_fields(), num_workers=workers)
    writer.from_indexed_dataset(_PackedImages(src, scanned, max_side, quality), chunksize=64)
    with open(manifest, "w") as handle:
        handle.write("index\tsource_path\theight\twidth\tstored\n")
        handle.writelines(f"{i}\t{s.path}\t{s.height}\t{s.width}\t{'original' if s.kept else 're-encoded'}\n"
                          for i, s in enumerate(scanned))
    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, out)
    kept = sum(s.kept for s in scanned)
    summary = {"packed": len(scanned), "kept": kept, "reencoded": len(scanned) - kept, "skipped": len(skipped),
               "out": str(out), "manifest": str(manifest), "skipped_report": str(report)}
    print(f"packed {len(scanned)} images into {out} ({kept} JPEG kept as-is, {len(scanned) - kept} re-encoded, "
          f"max side {max_side}); skipped {len(skipped)} unreadable"
          + (f" (listed in {report})" if skipped else "") + f"; manifest: {manifest}")
    return summary
