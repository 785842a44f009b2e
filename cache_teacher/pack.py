r"""`python -m cache_teacher pack SRC_DIR OUT.beton`: a folder tree of images -> FFCV images file.

Reads .jpg/.jpeg/.png/.gif/.webp/.bmp files, by content, not by name (a WebP named .jpg is a WebP; animated
GIF/WebP: the first frame). JPEGs that libjpeg-turbo decodes, in RGB or grey, and within ``--max-side`` are
stored byte for byte (no generation loss, no encode time); everything else (PNG, GIF, WebP, RGBA/palette/CMYK,
16-bit, oversized) is converted to 8-bit RGB (16-bit greyscale scaled by 255/65535, not clipped), shrunk to
``--max-side`` (area interpolation) and encoded once as JPEG. Every image's CRC32C is stored with it.
Two passes: a parallel scan that fully decodes every file (so a corrupt file is found and skipped here,
never at training time) and re-encodes what needs it, then FFCV's writer in one process over the files in
sorted order: the same folder always packs to the byte-identical file. Next to OUT.beton:
  OUT.beton.manifest.tsv  index -> source path (relative to SRC_DIR), size, how it was stored;
  OUT.beton.skipped.tsv   every file not packed (unreadable, or not an image type) with the reason.
Paths in both are escaped so that any file name round-trips (`escape_path` / `read_manifest`): backslash,
tab, newline, carriage return and other control bytes become \\, \t, \n, \r, \xHH, and bytes that are not
UTF-8 become \xHH (80-ff). The .beton appears only when complete (written under a temporary name, renamed).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import math
import multiprocessing as mp
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from dpal.errors import UserError
from formats.cli import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_SIDE
from formats.images import decode_jpeg, image_fields, jpeg_crc32c
from runtime.durable import atomic_write, disk_description

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}
MANIFEST_HEADER = "index\tsource_path\theight\twidth\tstored"
_SIXTEEN_BIT_GREY = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # PIL modes of 16-bit greyscale PNG/TIFF


class PackError(UserError):
    """Bad input to `pack`: the message names the path and what to do."""


@dataclass(frozen=True)
class ScannedImage:
    path: str  # relative to the source folder, '/'-separated (os.fsdecode: undecodable bytes as surrogates)
    height: int
    width: int
    kept: bool  # True: original JPEG bytes stored as-is
    spooled: tuple[int, int] | None = None  # re-encoded JPEG: (offset, size) in the scan's spool file


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPE = re.compile(r"\\(\\|t|n|r|x[0-9a-f]{2})")


def escape_path(path: str) -> str:
    """A file name as one printable TSV field, any bytes: see the module docstring; `unescape_path` inverts it."""
    out = []
    for char in path:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8 (os.fsdecode's surrogateescape)
            out.append(f"\\x{ord(char) - 0xdc00:02x}")
        elif ord(char) < 0x20 or ord(char) == 0x7f:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def unescape_path(field: str) -> str:
    """The exact file name (os.fsdecode form: `os.fsencode` gives its bytes) of an `escape_path` field."""
    def one(match: re.Match) -> str:
        code = match.group(1)
        if code[0] != "x":
            return {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}[code]
        value = int(code[1:], 16)
        return chr(0xdc00 + value) if value >= 0x80 else chr(value)
    return _UNESCAPE.sub(one, field)


@dataclass(frozen=True)
class ManifestRow:
    index: int
    source_path: str  # os.fsdecode form; SRC_DIR / source_path is the file
    height: int
    width: int
    stored: str  # "original" or "re-encoded"


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """The rows of an OUT.beton.manifest.tsv, paths unescaped."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines[0] != MANIFEST_HEADER:
        raise PackError(f"{path} is not a manifest written by `python -m cache_teacher pack`")
    rows = []
    for line in filter(None, lines[1:]):
        index, source, height, width, stored = line.split("\t")
        rows.append(ManifestRow(int(index), unescape_path(source), int(height), int(width), stored))
    return rows


def find_images(src: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files in sorted order, every other entry under `src` with why it is not packed): files of other
    types, dangling symbolic links, links that loop, links to folders (not followed: a folder's images are
    packed once, from where they are), entries that are not regular files, folders that cannot be listed."""
    if not src.is_dir():
        raise PackError(f"source folder {src} does not exist or is not a folder")
    files, skipped = [], []
    folders = [src]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            skipped.append((folder.relative_to(src).as_posix(), f"folder cannot be listed ({exc.strerror})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(src).as_posix()
            try:
                is_link, info = entry.is_symlink(), path.stat()
            except OSError as exc:
                skipped.append((rel, _unreachable(path, exc)))
                continue
            if stat.S_ISDIR(info.st_mode):
                if is_link:
                    skipped.append((rel, f"symbolic link to a folder ({os.readlink(path)}), not followed"))
                else:
                    folders.append(path)
            elif not stat.S_ISREG(info.st_mode):
                skipped.append((rel, "not a regular file (a FIFO, socket or device)"))
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
            else:
                skipped.append((rel, f"not an image type pack reads ({path.suffix or 'no suffix'})"))
    if not files:
        raise PackError(f"source folder {src} holds no images (looked for {sorted(IMAGE_SUFFIXES)})")
    return sorted(files), skipped


def _unreachable(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return f"symbolic link loop ({os.readlink(path)})"
    if isinstance(exc, FileNotFoundError) and path.is_symlink():
        return f"dangling symbolic link (to {os.readlink(path)}, which does not exist)"
    return f"cannot be read ({exc.strerror})"


def _keepable_jpeg(path: Path, max_side: int) -> tuple[np.ndarray, int, int] | None:
    """The file's bytes and size if they can be stored untouched, else None."""
    with Image.open(path) as img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or max(img.size) > max_side:
            return None
        width, height = img.size
    data = np.fromfile(path, dtype=np.uint8)
    return (data, height, width) if decode_jpeg(data, height, width) is not None else None


def _rgb(img: Image.Image) -> np.ndarray:
    """8-bit RGB pixels of any PIL image (first frame of an animation; alpha dropped)."""
    if img.mode in _SIXTEEN_BIT_GREY:
        # PIL's convert("RGB") clips 16-bit values at 255 (a 16-bit grey photo comes out almost all white)
        grey = np.asarray(img).astype(np.float64) * (255 / 65535)
        return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))  # grey, palette, CMYK, alpha (dropped), 16-bit RGB -> RGB


def _reencoded(path: Path, max_side: int, quality: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] JPEG bytes of any readable image, max side bounded."""
    with Image.open(path) as img:
        img.load()  # full decode: truncated or corrupt files raise here
        rgb = _rgb(img)
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


def _scan_one(args) -> tuple[str, tuple[int, int, bool, bytes] | None, str]:
    """(relative path, (height, width, kept, re-encoded JPEG bytes or b""), "") or (path, None, reason)."""
    path, rel, max_side, quality = args
    try:
        jpeg, height, width, kept = prepare_image(path, max_side, quality)
        return rel, (height, width, kept, b"" if kept else jpeg.tobytes()), ""
    except (OSError, ValueError, SyntaxError, EOFError, cv2.error, Image.DecompressionBombError) as exc:
        # what PIL / OpenCV raise for unreadable files: skip and report, never abort the pack
        return rel, None, f"{type(exc).__name__}: {exc}"


class _PackedImages:
    """Indexed dataset for FFCV's writer: kept JPEGs from the source, re-encoded ones from the scan's spool."""

    def __init__(self, src: Path, scanned: list[ScannedImage], spool: Path):
        self.src, self.scanned, self.spool = src, scanned, spool

    def __len__(self) -> int:
        return len(self.scanned)

    def __getitem__(self, index: int):
        item = self.scanned[index]
        if item.kept:
            jpeg = np.fromfile(self.src / item.path, dtype=np.uint8)
        else:
            offset, size = item.spooled
            jpeg = np.fromfile(self.spool, dtype=np.uint8, count=size, offset=offset)
        return jpeg, item.height, item.width, jpeg_crc32c(jpeg)


def _check_output(out: Path) -> None:
    parent = out.resolve().parent
    if not parent.is_dir():
        raise PackError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise PackError(f"output folder {parent} is not writable")
    if out.suffix != ".beton":
        raise PackError(f"output {out} should end in .beton")


PAGE_SIZE = 1 << 23  # FFCV's default page: its writer flushes whole pages


def _check_space(out: Path, src: Path, scanned: list[ScannedImage], spool: Path) -> None:
    """Refuse before FFCV's writer starts if the disk cannot hold the file: a writer process that fails on a
    full disk is never noticed by FFCV's parent, which then waits forever."""
    sizes = [item.spooled[1] if item.spooled else (src / item.path).stat().st_size for item in scanned]
    pages = math.ceil(sum(sizes) / max(1, PAGE_SIZE - max(sizes))) + 1  # a sample never straddles two pages
    needed = pages * PAGE_SIZE + len(scanned) * 256 + (1 << 20)  # + metadata, allocation table, manifest
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise PackError(f"{out} needs up to {needed / 2 ** 20:.1f} MiB (FFCV writes whole {PAGE_SIZE >> 20} MiB "
                        f"pages), {disk_description(out.parent)}; free space, or choose another OUT.beton on a "
                        f"larger disk (nothing was written)")


def _text_lines(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


@contextlib.contextmanager
def _labelled_writer_bar(label: str, *, enabled: bool):
    """FFCV's writer draws a bare tqdm bar and has no option for it: for the write, its module's `tqdm` is one
    with this label (or disabled), then the original again."""
    import ffcv.writer

    original = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(original, desc=label, unit="img", disable=not enabled)
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


def pack(src: str | os.PathLike, out: str | os.PathLike, *, max_side: int = DEFAULT_MAX_SIDE,
         quality: int = DEFAULT_JPEG_QUALITY, workers: int | None = None, progress: bool = True) -> dict:
    """Pack ``src`` into ``out``; returns a summary dict (packed, kept, reencoded, skipped, paths)."""
    from ffcv.writer import DatasetWriter

    src, out = Path(src), Path(out)
    if max_side < 16:
        raise PackError(f"--max-side {max_side} is too small (use >= 16; default {DEFAULT_MAX_SIDE})")
    _check_output(out)
    files, skipped = find_images(src)
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(path, path.relative_to(src).as_posix(), max_side, quality) for path in files]
    report = out.with_name(out.name + ".skipped.tsv")
    manifest = out.with_name(out.name + ".manifest.tsv")
    partial = out.with_name(out.name + ".partial")
    spool = out.with_name(out.name + ".reencoded.partial")
    scanned = []
    skip_lines = lambda: _text_lines(["source_path\treason"] + [f"{escape_path(rel)}\t{escape_path(reason)}"
                                                               for rel, reason in sorted(skipped)])
    try:
        with mp.get_context("fork").Pool(workers) as pool, open(spool, "wb") as spooled:
            for rel, item, reason in tqdm(pool.imap(_scan_one, jobs, chunksize=16), total=len(jobs), unit="img",
                                          desc=f"scan {escape_path(src.name)}", disable=not progress):
                if item is None:
                    skipped.append((rel, reason))
                    continue
                height, width, kept, jpeg = item
                scanned.append(ScannedImage(rel, height, width, kept, None if kept else (spooled.tell(), len(jpeg))))
                spooled.write(jpeg)
        if not scanned:
            atomic_write({report: skip_lines()})
            raise PackError(f"none of the {len(files)} images under {src} could be read; see {report}")
        _check_space(out, src, scanned, spool)
        # One writer process: FFCV's parallel writer places samples in pages in whatever order its workers
        # finish, so the same folder would give different bytes; the expensive part (decode, re-encode) ran above.
        writer = DatasetWriter(str(partial), image_fields(), num_workers=1, page_size=PAGE_SIZE)
        with _labelled_writer_bar(f"write {escape_path(out.name)}", enabled=progress):
            writer.from_indexed_dataset(_PackedImages(src, scanned, spool), chunksize=64)
        # The three files appear together: a failure before leaves none of them (no report of a pack that is not)
        atomic_write({report: skip_lines(), manifest: _text_lines([MANIFEST_HEADER] + [
            f"{i}\t{escape_path(s.path)}\t{s.height}\t{s.width}\t{'original' if s.kept else 're-encoded'}"
            for i, s in enumerate(scanned)]), out: partial})
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise PackError(f"disk full while packing {out} ({exc.strerror}"
                        f"{f' writing {exc.filename}' if exc.filename else ''}, {disk_description(out.parent)}); nothing was written: free space and run the command "
                        f"again") from None
    finally:
        partial.unlink(missing_ok=True)
        spool.unlink(missing_ok=True)
    kept = sum(s.kept for s in scanned)
    summary = {"packed": len(scanned), "kept": kept, "reencoded": len(scanned) - kept, "skipped": len(skipped),
               "out": str(out), "manifest": str(manifest), "skipped_report": str(report)}
    print(f"packed {len(scanned)} images into {out} ({kept} JPEG kept as-is, {len(scanned) - kept} re-encoded, "
          f"max side {max_side}); skipped {len(skipped)} entries (unreadable, not images, or links not followed)"
          + (f", listed in {report}" if skipped else "") + f"; manifest: {manifest}")
    return summary
