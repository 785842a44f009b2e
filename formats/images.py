"""Variable-size JPEG images in FFCV files: the layout, a batched FFCV decoder, random access, integrity.

Layout of an images file (only stock FFCV field types, so any FFCV reader opens it):
  ``image``  BytesField: the JPEG bytes exactly as stored (source JPEGs are kept byte for byte);
  ``height`` IntField, ``width`` IntField: the decoded size, kept in FFCV's metadata table so that
  every image's shape is known without touching the data region;
  ``crc32c`` IntField: the CRC32C of the image's JPEG bytes, recorded by `pack` (the loader skips it).
Integrity: `check_images` recomputes every image's CRC32C (a full pass over the file, I/O-bound: see the
README for its cost; `verify` and the trainer's start run it), and `ImageFile.image` checks the image it
decodes. The fingerprint hashes the metadata table exactly, CRC32Cs included, so it identifies every byte of
an intact file, cheaply.

Why not ``RGBImageField``: its only pass-through decoder (``SimpleRGBImageDecoder``) refuses images
of different sizes, and its writer re-encodes every JPEG. Here the decoder is our own FFCV
``Operation`` that calls FFCV's own libjpeg-turbo ``imdecode`` (the same function the random-access
reader uses, so both stages see identical pixels). Its output is a flat uint8 row per sample
holding the image's ``h*w*3`` bytes first (no copy, no padding pass); ``unflatten_images`` turns a
batch back into a list of ``[H, W, 3]`` tensors using the height/width fields of the same batch.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import google_crc32c
import numpy as np
import torch
from ffcv.fields import BytesField, IntField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.bytes import BytesDecoder
from ffcv.libffcv import imdecode
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State
from ffcv.reader import Reader

from dpal.errors import UserError, file_problem

IMAGE_FIELDS = ("image", "height", "width", "crc32c")


def image_fields() -> dict:
    """The FFCV fields an images file is written with (order matters: it is the sample tuple order)."""
    return {"image": BytesField(), "height": IntField(), "width": IntField(), "crc32c": IntField()}


def jpeg_crc32c(jpeg: np.ndarray) -> int:
    """The checksum recorded per image (of its stored JPEG bytes)."""
    return google_crc32c.value(np.ascontiguousarray(jpeg, dtype=np.uint8).tobytes())


REPACK_HINT = ("re-pack it from its source folder with `python -m cache_teacher pack` (packing is deterministic: "
               "the same folder gives the same file, so stores and runs made from it still fit)")


class ImagesFileError(UserError):
    """An images file is missing or not in the layout this module writes."""


def _open_reader(path: str | os.PathLike) -> Reader:
    path = Path(path)
    if (path / "zarr.json").is_file():
        raise ImagesFileError(f"{path} is a target store (written by `python -m cache_teacher run`), not an images "
                              f"file: pass the .beton written by `python -m cache_teacher pack`")
    if path.is_dir():
        raise ImagesFileError(f"{path} is a folder, not an images file: pass the .beton written by `python -m "
                              f"cache_teacher pack`, or pack this folder first (`python -m cache_teacher pack "
                              f"{path} {path.name}.beton`)")
    if problem := file_problem(path):
        raise ImagesFileError(f"images file {path} {problem}; create it with "
                              f"`python -m cache_teacher pack SRC_DIR {path.name}`")
    try:
        reader = Reader(str(path))
    except Exception as exc:  # FFCV raises bare AssertionError/ValueError on foreign or truncated files
        raise ImagesFileError(f"{path} is not a readable FFCV file ({exc}); re-create it with "
                              f"`python -m cache_teacher pack`") from exc
    if tuple(reader.field_names) != IMAGE_FIELDS:
        raise ImagesFileError(f"{path} has FFCV fields {reader.field_names}, expected {list(IMAGE_FIELDS)} "
                              f"(files written by this version of `python -m cache_teacher pack`); re-create it "
                              f"with `python -m cache_teacher pack`")
    return reader


def _field_metadata(reader: Reader, name: str) -> np.ndarray:
    """FFCV names a file's metadata columns f0, f1, ... in field order."""
    return reader.metadata[f"f{reader.field_names.index(name)}"]


class JPEGImageDecoder(BytesDecoder):
    """FFCV decoder for the ``image`` field: each sample becomes a flat uint8 row, image bytes first.

    Shapes come from the file's height/width metadata (read once here), because an FFCV decoder only
    sees its own field's metadata. It subclasses ``BytesDecoder`` because FFCV only accepts, as a
    pipeline's first step, an instance of the field's decoder class.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        reader = _open_reader(path)
        self.heights = np.ascontiguousarray(_field_metadata(reader, "height"), dtype=np.uint32)
        self.widths = np.ascontiguousarray(_field_metadata(reader, "width"), dtype=np.uint32)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        row = (int((self.heights.astype(np.uint64) * self.widths * 3).max()),)
        return (replace(previous_state, jit_mode=True, shape=row, dtype=np.dtype("<u1")),
                AllocationQuery(row, np.dtype("<u1")))

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        imdecode_c = Compiler.compile(imdecode)
        my_range = Compiler.get_iterator()
        heights, widths = self.heights, self.widths

        def decode(batch_indices, destination, metadata, storage_state):
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                data = mem_read(field["ptr"], storage_state)[:field["size"]]
                height, width = heights[source_ix], widths[source_ix]
                imdecode_c(data, destination[dst_ix], height, width, height, width, 0, 0, 1, 1, False, False)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def image_pipelines(path: str | os.PathLike) -> dict:
    """FFCV ``Loader`` pipelines for an images file; batches are ``(flat_images, heights, widths)``."""
    return {"image": [JPEGImageDecoder(path)], "height": [IntDecoder()], "width": [IntDecoder()], "crc32c": None}


def unflatten_images(flat, heights, widths) -> list[torch.Tensor]:
    """Views of a decoded batch as uint8 ``[H, W, 3]`` tensors (no copy)."""
    flat = torch.as_tensor(flat)
    hs, ws = np.asarray(heights).reshape(-1), np.asarray(widths).reshape(-1)
    return [flat[i, :int(h) * int(w) * 3].view(int(h), int(w), 3) for i, (h, w) in enumerate(zip(hs, ws))]


class ImageFile:
    """Random access to the images of a packed file (memory-mapped; safe to share across threads)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        reader = _open_reader(self.path)
        self.num_images = int(reader.num_samples)
        self.heights = np.asarray(_field_metadata(reader, "height"), dtype=np.int64)
        self.widths = np.asarray(_field_metadata(reader, "width"), dtype=np.int64)
        self._ptrs = np.asarray(_field_metadata(reader, "image")["ptr"], dtype=np.uint64)
        self._sizes = np.asarray(_field_metadata(reader, "image")["size"], dtype=np.uint64)
        self._crcs = np.asarray(_field_metadata(reader, "crc32c"), dtype=np.int64)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        with open(self.path, "rb") as handle:  # bytes slices of an mmap: the fastest input for google_crc32c
            self._mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return self.num_images

    def span(self, index: int) -> tuple[int, int]:
        """(file offset, byte length) of image `index`'s JPEG bytes."""
        return int(self._ptrs[index]), int(self._sizes[index])

    def jpeg_bytes(self, index: int) -> np.ndarray:
        start, size = self.span(index)
        return self._data[start:start + size]

    def intact(self, index: int) -> bool:
        """Whether image `index`'s bytes still have the CRC32C recorded when it was packed."""
        start, size = self.span(index)
        return google_crc32c.value(self._mapped[start:start + size]) == int(self._crcs[index])

    def damaged(self, indices=None) -> list[int]:
        """The images (all, or `indices`) whose bytes no longer match their recorded CRC32C (~4 us per 16 KB
        image from the page cache)."""
        starts, ends, crcs = self._ptrs.tolist(), (self._ptrs + self._sizes).tolist(), self._crcs.tolist()
        return [i for i in (range(self.num_images) if indices is None else indices)
                if google_crc32c.value(self._mapped[starts[i]:ends[i]]) != crcs[i]]

    def size_mismatch(self, indices, heights, widths) -> str | None:
        """Why a decoded batch (its images' heights and widths) is not images `indices` of this file, or None
        when every image has the size recorded for it."""
        indices = np.asarray(indices).reshape(-1)
        heights, widths = np.asarray(heights).reshape(-1), np.asarray(widths).reshape(-1)
        if len(heights) != len(indices):
            return f"{len(heights)} images decoded for {len(indices)} indices"
        wrong = np.flatnonzero((heights != self.heights[indices]) | (widths != self.widths[indices]))
        if len(wrong) == 0:
            return None
        at, index = int(wrong[0]), int(indices[wrong[0]])
        return (f"{len(wrong)} of {len(indices)} differ in size, first at position {at}: decoded {heights[at]}x"
                f"{widths[at]}, image {index} is {self.heights[index]}x{self.widths[index]}")

    def image(self, index: int) -> np.ndarray:
        """Decoded RGB uint8 ``[H, W, 3]``, bit-identical to what ``JPEGImageDecoder`` produces; checked first."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} out of range for {self.path} ({self.num_images} images)")
        if not self.intact(index):
            raise ImagesFileError(f"image {index} of {self.path} is damaged (CRC32C mismatch); {REPACK_HINT}")
        out = decode_jpeg(self.jpeg_bytes(index), int(self.heights[index]), int(self.widths[index]))
        if out is None:
            raise ImagesFileError(f"image {index} of {self.path} could not be decoded")
        return out


def decode_jpeg(jpeg: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """Decode JPEG bytes with the same libjpeg-turbo call the loader uses; None if they do not decode."""
    out = np.empty((height, width, 3), dtype=np.uint8)
    ok = imdecode(np.ascontiguousarray(jpeg, dtype=np.uint8), out, height, width, height, width,
                  0, 0, 1, 1, False, False) == 0
    return out if ok else None


def check_images(path: str | os.PathLike, *, progress: bool = False) -> None:
    """Recompute the CRC32C of every image in the file; ImagesFileError naming the file and images if any fail."""
    from tqdm import tqdm

    images = ImageFile(path)
    damaged = images.damaged(tqdm(range(images.num_images), desc=f"check {images.path.name}", unit="img",
                                  disable=not progress, mininterval=1.0))
    if damaged:
        raise ImagesFileError(f"{images.path}: {len(damaged)} of {images.num_images} images are damaged (CRC32C "
                              f"mismatch; first: {damaged[:5]}); {REPACK_HINT}")


_FINGERPRINT_SAMPLES = 256
_FINGERPRINT_BLOCK = 4096


def images_fingerprint(path: str | os.PathLike) -> str:
    """Identity of an images file, cheap on a 40 GB file (the trainer checks it at every start).

    Hashes the size, FFCV's header/field/metadata tables (every image's shape, pointer, byte length and
    CRC32C) and the allocation table exactly, plus 256 evenly spaced 4 KiB blocks of the data region.
    Any re-pack of other or re-ordered images changes it. Through the CRC32Cs it names every image's bytes,
    but it does not read them: `check_images` is what detects a damaged file.
    """
    reader = _open_reader(path)
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    digest.update(reader.header.tobytes())
    digest.update(reader.field_descriptors.tobytes())
    digest.update(reader.metadata.tobytes())
    digest.update(reader.alloc_table.tobytes())
    with open(path, "rb") as handle:
        for offset in np.linspace(0, max(size - _FINGERPRINT_BLOCK, 0), _FINGERPRINT_SAMPLES).astype(np.int64):
            handle.seek(int(offset))
            digest.update(handle.read(_FINGERPRINT_BLOCK))
    return digest.hexdigest()
