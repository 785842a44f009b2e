"""The teacher target store: layout, writer, block reader (one Zarr v3 group per teacher run; its arrays are the
schema's, `formats.schema`).

Layout of STORE.zarr (arrays indexed [image, view_set, ...], I images, K view sets per image):
  view_params [I, K, F] float32      every random decision of the view set (dpal.views records)
  global      [I, K, D] float16      global target (CLS / mean token)
  local       [I, K, N, D]           patch tokens of the global view: float16, or int8 + local_scale [I, K, N]
  mask        [I, K, N] float16      shape mask in [0, 1] (calibration in the attributes)
  relation    [I, K, Nc, Nc]         crowd-view relation probabilities: float16, or int8 + relation_scale [I, K, Nc]
  compact stores: local [I, K, N, rank] basis coefficients (the basis in token_basis.npy), relation
  [I, K, Nc, k] the kept entries' codes, with relation_index [I, K, Nc, k] int16 and relation_rest [I, K, Nc]
  float32 when k < Nc (the schema's table, `formats.schema.store_arrays`)
  dpal_progress/shard_NNNNNN.json    one marker per finished shard (file sizes + CRC32C of its shard files)
Group attribute ``dpal_store`` holds the identity of the run (`StoreSpec`: teacher, checkpoint sha256, view
config, image file fingerprint, format, ...) and a unique ``store_id`` drawn when the store is created:
`check_compatible` (and a resumed `run`) refuse anything that differs, and a training run records all of it.
Array names, fields, shapes and dtypes are the schema's (`formats.schema`); how the targets are coded in them,
the coding's (`formats.targets`).

Integrity: every chunk ends in its CRC32C (Zarr's crc32c codec after Blosc) and the shard index has its own,
so every read (the trainer's block reader, and Zarr's own) checks the bytes it uses; the trainer's reader names
the damaged file and the repair.
A rerun of `cache_teacher run` rechecks each finished shard file against the CRC32C in its marker and rewrites
the shards that fail (the repair). Writers hold `runtime.durable.WriterLock` (one `cache_teacher run` job per
store).

Chunks are view-set-major: a chunk holds ONE view set of ``chunk_images`` consecutive images (shape
[chunk_images, 1, ...], whole rows), sized so a `local` chunk is >= 1 MiB. The trainer uses one view set
per image and epoch, and picks it per block, so a block read (`read_block(block, view_set)`) decompresses
exactly one chunk per array and nothing it does not use (format 1 stored all K sets in a chunk, so every
read decompressed K times the needed bytes). Chunks are grouped into Zarr shards of ``shard_images``
images and all K view sets (one file per array and shard): the unit of work, of writing (exactly one
writer), of durability and of resume. A shard is written whole, fsynced, its files hashed, and only then is
its marker written (atomically); a shard without a marker is rewritten from scratch on resume, so a killed
run never leaves a half-written shard that reads as complete. Compression is lossless Blosc with byte shuffle: lz4 by
default (a PATH-B float16 block read, one view set of 8 images, costs ~0.07 ms of CPU per image, so the
trainer's CPU feed keeps up; float16 tokens shrink ~5-15%, relations ~30%), or zstd (~1.2x / ~1.7x smaller,
but ~5x the decode CPU, ~0.33 ms per image: a third of the 2-core feed budget) when disk matters more. The
int8 format quantizes per row: q = round(x / s), s = max|row| / 127, x ~= q * s.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.sync import sync as zarr_sync
from zarr.storage import LocalStore

from dpal.config import Recipe, TeacherSpec, ViewConfig, token_counts
from dpal.errors import UserError
from dpal.views import VIEW_PARAMS_VERSION
from formats.run_spec import spec_dict, spec_differences
from formats.schema import CODECS, TARGET_FORMATS, CompactKnobs, store_arrays
from formats.targets import CompactCoding, TokenBasis, read_targets
from runtime.durable import atomic_write, fsync_path, fsync_tree

# 5: the compact target format (basis file; knobs and fidelity figures in the attributes);
# 4: every chunk ends in its CRC32C, shard markers record file CRC32Cs, attributes hold a unique store_id;
# 3: int8 relation rows are log-domain codes (`dpal.losses.quantize_relation`); 2: chunks hold one view set
# (view-set-major), int8 relation rows were linear; 1: chunks held all K view sets of their images.
STORE_FORMAT_VERSION = 5
SPEC_VERSION = 3  # revision of docs/method.md whose targets the store holds
# What the targets of an older spec revision got wrong (docs/method.md, "Changes to this text"), for the refusal.
_STALE_SPEC_TARGETS = {1: "old teacher position-embedding resize",
                       2: "view records v1: crop boxes shrunk to fit instead of redrawn, positions rounded"}
ATTRS_KEY = "dpal_store"
PROGRESS_DIR = "dpal_progress"
MIN_CHUNK_BYTES = 1 << 20
DEFAULT_SHARD_BYTES = 256 << 20  # uncompressed bytes of one shard across arrays: the unit of work
TOKEN_BASIS_FILE = "token_basis.npz"  # compact stores: `formats.targets.TokenBasis.save()`


class StoreError(UserError):
    """A store that is missing, incomplete, corrupt, from another format, or made by another run."""


def repair_hint(store: Path) -> str:
    return (f"repair the store by re-running the `python -m cache_teacher run` command that made it (same "
            f"arguments, --out {store}): it rechecks every finished shard against its recorded CRC32C and rewrites "
            f"the damaged ones")


@dataclass(frozen=True)
class StoreLayout:
    """Shapes of a store; everything else about arrays follows from it."""

    num_images: int
    views_per_image: int
    view_fields: int
    width: int  # D_t
    tokens: int  # N: patch tokens of the global view
    crowd_tokens: int  # Nc: all tokens of the crowd view
    target_format: str
    chunk_images: int
    shard_images: int
    compact: CompactKnobs | None = None  # the compact format's knobs

    def array_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape after [I, K], dtype), from the schema's table (`formats.schema.store_arrays`)."""
        arrays = store_arrays(self.target_format, view_fields=self.view_fields, width=self.width, tokens=self.tokens,
                              crowd_tokens=self.crowd_tokens, compact=self.compact)
        return {name: (array.shape, array.dtype) for name, array in arrays.items()}

    def bytes_per_view_set(self) -> dict[str, int]:
        """Uncompressed bytes of each array per view set."""
        return {name: int(np.prod(shape)) * np.dtype(dtype).itemsize
                for name, (shape, dtype) in self.array_specs().items()}

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.shard_images)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_images / self.chunk_images)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_images
        return start, min(start + self.shard_images, self.num_images)


@dataclass(frozen=True)
class StoreSpec:
    """What defines a store: the identity `cache_teacher run` records in the store's attributes, beside the
    mask calibration fitted when it was created, its input files' locations and its unique store_id. Built
    once per run from the command line and the inputs; a rerun resumes only a store of exactly this identity."""

    teacher_spec: TeacherSpec
    view_config: ViewConfig
    checkpoint_sha256: str
    teacher_options: dict  # how the checkpoint was loaded (`dpal.teachers.teacher_options`)
    teacher_precision: str  # `formats.teacher_side.teacher_precision` of the device that ran the teacher
    images_fingerprint: str
    backgrounds_fingerprint: str
    num_images: int
    num_backgrounds: int
    views_per_image: int
    seed: int  # of the view records (`formats.view_records.image_view_params`)
    calibration_images: int
    batch_size: int  # view sets per teacher batch: GEMM rounding depends on the batch shape
    target_format: str
    codec: str
    chunk_images: int
    shard_images: int
    token_grid: tuple[int, int]
    compact: CompactKnobs | None = None
    format_version: int = STORE_FORMAT_VERSION
    spec_version: int = SPEC_VERSION
    view_params_version: int = VIEW_PARAMS_VERSION

    def identity(self) -> dict:
        """The identity as the attributes hold it (JSON values; the teacher also named on its own)."""
        return {"teacher": self.teacher_spec.name, **spec_dict(self)}


# Every attribute a store's record holds besides its identity: what reading it needs, its inputs' locations and
# its unique id. A store lacking any of these or of its identity (an edited or damaged zarr.json) is refused by
# training and `verify` alike: runs made from it could not be told apart from another store's.
RECORD_ATTRS = ("mask_calibration", "view_fields", "crowd_tokens", "images_path", "backgrounds_path", "store_id")


def check_record_complete(attrs: dict, path: Path) -> None:
    required = ["teacher", *(field.name for field in dataclasses.fields(StoreSpec)), *RECORD_ATTRS]
    missing = [key for key in required if key not in attrs]
    if missing:
        raise StoreError(f"{path} lacks {', '.join(missing)} in its record ({path / 'zarr.json'}, attribute "
                         f"'{ATTRS_KEY}'): it was edited or damaged and cannot be told apart from another store; "
                         f"rebuild it with `python -m cache_teacher run` into a new --out folder")


def plan_layout(spec: TeacherSpec, cfg: ViewConfig, *, num_images: int, views_per_image: int, view_fields: int,
                target_format: str, chunk_images: int | None = None, shard_images: int | None = None,
                compact: CompactKnobs | None = None) -> StoreLayout:
    """Chunk = smallest power of two of images whose `local` chunk (one view set) is >= 1 MiB; shard ~256 MiB.
    `compact`: the knobs of a compact store (checked against the teacher's width and crowd tokens)."""
    if views_per_image < 1:
        raise StoreError(f"--views-per-image must be >= 1, got {views_per_image}")
    if target_format not in TARGET_FORMATS:
        raise StoreError(f"unknown target format {target_format!r}; choose one of {', '.join(TARGET_FORMATS)}")
    _, tokens, crowd_tokens = token_counts(spec, cfg)
    if (target_format == "compact") != (compact is not None):
        raise StoreError(f"compact knobs go with --format compact only (format {target_format!r})")
    if compact is not None and (problem := compact.problem(width=spec.width, crowd_tokens=crowd_tokens)):
        raise StoreError(f"{problem} for teacher {spec.name}")
    probe = StoreLayout(num_images, views_per_image, view_fields, spec.width, tokens, crowd_tokens, target_format, 1, 1,
                        compact)
    per_view_set = probe.bytes_per_view_set()
    per_image = {k: v * views_per_image for k, v in per_view_set.items()}
    if chunk_images is None:
        chunk_images = 1 << max(0, math.ceil(math.log2(MIN_CHUNK_BYTES / per_view_set["local"])))
    if chunk_images < 1:
        raise StoreError(f"chunk_images must be >= 1, got {chunk_images}")
    if shard_images is None:
        chunks = max(1, DEFAULT_SHARD_BYTES // (sum(per_image.values()) * chunk_images))
        shard_images = chunk_images * min(chunks, math.ceil(num_images / chunk_images))
    if shard_images < chunk_images or shard_images % chunk_images:
        raise StoreError(f"shard_images ({shard_images}) must be a positive multiple of chunk_images ({chunk_images})")
    return dataclasses.replace(probe, chunk_images=chunk_images, shard_images=shard_images)


def _compressor(dtype: str, codec: str) -> BloscCodec:
    if codec not in CODECS:
        raise StoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    # Byte shuffle groups the exponent/high bytes of float16/float32 values: the main win for lossless tokens.
    return BloscCodec(cname=codec, clevel=5, shuffle="shuffle" if np.dtype(dtype).itemsize > 1 else "noshuffle")


def _chunk_codecs(dtype: str, codec: str) -> tuple[BloscCodec, Crc32cCodec]:
    """Bytes -> Blosc -> CRC32C: each chunk carries the checksum of its compressed bytes (checked on every read)."""
    return _compressor(dtype, codec), Crc32cCodec()


def view_config_from_dict(data: dict) -> ViewConfig:
    fields = {f.name: f for f in dataclasses.fields(ViewConfig)}
    unknown = set(data) - set(fields)
    if unknown:
        raise StoreError(f"store view_config has fields this version does not know: {sorted(unknown)}")
    return ViewConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def describe_differences(stored: dict, expected: dict, keys) -> list[str]:
    """One readable line per key whose value differs between the store's attributes and this run's (dict
    values: one line naming the differing sub-keys)."""
    out = []
    found = spec_differences(stored, expected, keys)  # in key order: a dict's sub-keys follow each other
    for key, group in itertools.groupby(found, key=lambda difference: difference[0].partition(".")[0]):
        group = list(group)
        if group[0][0] == key:
            out.append(f"{key}: store has {group[0][1]!r}, this run has {group[0][2]!r}")
        else:
            out.append(f"{key} differs in " + ", ".join(f"{path.partition('.')[2]} (store {have!r}, this run {want!r})"
                                                          for path, have, want in group))
    return out


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_crc32c(path: str | os.PathLike, block: int = 1 << 22) -> int:
    """CRC32C of a whole file (~5x faster than sha256 here; it detects damage, it is not an identity)."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            crc = google_crc32c.extend(crc, chunk)
    return crc


def store_lock_path(store: str | os.PathLike) -> Path:
    """The lock file of a store: a hidden sibling, since the store itself appears only when complete; beside the
    store's real location, so that every path to it (a symlink, `..`) meets the same lock."""
    store = Path(store).resolve()
    return store.with_name(f".{store.name}.lock")


def check_format_version(attrs: dict, path: Path) -> None:
    version = attrs.get("format_version")
    if isinstance(version, int) and version > STORE_FORMAT_VERSION:
        raise StoreError(f"{path} was written in store format {version} by a newer version of this code, which "
                         f"reads format {STORE_FORMAT_VERSION}; update the code to read it")
    if version != STORE_FORMAT_VERSION:
        raise StoreError(f"{path} was written in store format {version}; this version reads format "
                         f"{STORE_FORMAT_VERSION} and cannot use it. Re-run "
                         f"`python -m cache_teacher run` into a new --out folder to rebuild the store.")


def check_spec_version(attrs: dict, path: Path) -> None:
    version = attrs.get("spec_version")
    if version != SPEC_VERSION:
        why = _STALE_SPEC_TARGETS.get(version, "targets of another spec revision")
        raise StoreError(f"{path} was written under spec v{version} ({why}); this code computes spec "
                         f"v{SPEC_VERSION} targets. Rebuild it with `python -m cache_teacher run` into a new --out "
                         f"folder.")


def read_json(path: Path) -> dict:
    """A JSON object file of a store (zarr.json, a shard marker); a damaged one is a StoreError naming it."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} is damaged (not valid JSON: {exc}); the store cannot be trusted, re-run "
                         f"`python -m cache_teacher run` into a new --out folder") from None
    if not isinstance(value, dict):
        raise StoreError(f"{path} is damaged (not a JSON object); re-run the cache into a new --out folder")
    return value


def _open_group(path: Path, mode: str):
    """The store's Zarr group; damaged metadata (a truncated zarr.json) is a StoreError naming the file."""
    for meta in [path / "zarr.json", *sorted(path.glob("*/zarr.json"))]:
        read_json(meta)  # zarr's own errors do not name the file
    return zarr.open_group(LocalStore(path, read_only=mode == "r"), mode=mode, zarr_format=3)


def read_attrs(path: str | os.PathLike, option: str = "--store") -> dict:
    """The store's record; `option` names where the path came from (--out when writing), for the remedy."""
    path = Path(path)
    meta = path / "zarr.json"
    remedy = ("choose another --out" if option == "--out" else
              f"pass as {option} a store folder written by `python -m cache_teacher run`")
    if path.exists() and not path.is_dir():
        raise StoreError(f"{option} {path} is a file, not a store folder; {remedy}")
    if not meta.is_file():
        raise StoreError(f"{option} {path} is not a Zarr store (no zarr.json); {remedy}")
    attrs = read_json(meta).get("attributes", {}).get(ATTRS_KEY)
    if attrs is None:
        raise StoreError(f"{path} is a Zarr group but not a DPAL target store (no '{ATTRS_KEY}' attribute)")
    return attrs


SETTLE_SECONDS = 30.0  # longest wait for zarr's writes in flight after a failed one


def _settle_zarr_writes() -> None:
    """Wait for the writes zarr still has in flight. Zarr writes a group's keys concurrently, each in a thread;
    when one fails, the error reaches the caller while the others go on, and a late one would make its folder
    again after the caller removed it."""
    async def settle():
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if others:  # bounded: a write stuck on a dead disk must not hang the refusal
            await asyncio.wait(others, timeout=SETTLE_SECONDS)
    zarr_sync(settle())


class StoreWriter:
    """Creates a store atomically and writes whole shards, each durable before its marker."""

    def __init__(self, path: Path, layout: StoreLayout):
        self.path, self.layout = Path(path), layout
        group = _open_group(self.path, "r+")
        self.arrays = {name: group[name] for name in layout.array_specs()}

    @classmethod
    def create(cls, path: str | os.PathLike, attrs: dict, layout: StoreLayout,
               basis: TokenBasis | None = None) -> "StoreWriter":
        """Build the empty store under a temporary name, fsync it, then rename: it appears complete or not at all.
        A compact store's `basis` is written beside the arrays, its sha256 in the attributes."""
        path = Path(path)
        staging = path.with_name(f"{path.name}.creating-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            group = zarr.open_group(LocalStore(staging), mode="w", zarr_format=3)
            lead = (layout.num_images, layout.views_per_image)
            codec = attrs.get("codec", CODECS[0])
            for name, (shape, dtype) in layout.array_specs().items():
                group.create_array(name, shape=lead + shape, dtype=dtype, fill_value=0,
                                   chunks=(layout.chunk_images, 1) + shape,
                                   shards=(layout.shard_images, layout.views_per_image) + shape,
                                   compressors=_chunk_codecs(dtype, codec), config={"write_empty_chunks": True})
            if basis is not None:
                basis.save(staging / TOKEN_BASIS_FILE)
                attrs = dict(attrs, token_basis_sha256=file_sha256(staging / TOKEN_BASIS_FILE))
            group.attrs[ATTRS_KEY] = attrs
            (staging / PROGRESS_DIR).mkdir()
            fsync_tree(staging)
            os.rename(staging, path)
        except OSError as exc:  # a full disk, a vanished folder: nothing is left behind, nothing was created
            _settle_zarr_writes()
            shutil.rmtree(staging, ignore_errors=True)
            raise StoreError(f"cannot create store {path}: {exc.strerror or exc}; nothing was created, fix that "
                             f"and run the same command again") from None
        fsync_path(path.parent)
        return cls(path, layout)

    def shard_files(self, shard: int) -> dict[str, Path]:
        return {name: self.path / name / array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
                for name, array in self.arrays.items()}

    def marker_path(self, shard: int) -> Path:
        return self.path / PROGRESS_DIR / f"shard_{shard:06d}.json"

    def is_done(self, shard: int) -> bool:
        return self.marker_path(shard).is_file()

    def damaged_files(self, shard: int) -> list[str]:
        """The finished shard's files that are missing or differ from the sizes and CRC32Cs in its marker (an
        unreadable marker counts as damage too: the shard is rewritten either way)."""
        try:
            return shard_file_problems(self.path, json.loads(self.marker_path(shard).read_text()))
        except (ValueError, KeyError, TypeError):
            return [f"shard {shard}: its marker {self.marker_path(shard)} is unreadable"]

    def forget(self, shard: int) -> None:
        """Drop a shard's marker (durably) so that it is rewritten from scratch."""
        self.marker_path(shard).unlink(missing_ok=True)
        fsync_path(self.marker_path(shard).parent)

    def write_shard(self, shard: int, data: dict[str, np.ndarray]) -> None:
        start, stop = self.layout.shard_range(shard)
        files = self.shard_files(shard)
        for path in files.values():  # leftovers of a killed write: never merged, always replaced
            path.unlink(missing_ok=True)
        for name, array in self.arrays.items():
            block = data[name]
            if block.shape != (stop - start,) + array.shape[1:]:
                raise StoreError(f"shard {shard}: {name} has shape {block.shape}, expected "
                                 f"{(stop - start,) + array.shape[1:]}")
            array[start:stop] = block
        record = {"shard": shard, "images": [start, stop], "files": {}}
        for name, path in files.items():
            fsync_path(path)
            for folder in (path.parent, *path.parent.parents):
                fsync_path(folder)
                if folder == self.path:
                    break
            record["files"][name] = {"key": path.relative_to(self.path).as_posix(),
                                     "bytes": path.stat().st_size, "crc32c": file_crc32c(path)}
        atomic_write({self.marker_path(shard): json.dumps(record).encode()})


def integrity_problems(store: "TargetStore") -> list[str]:
    """Missing shards and shard files whose size or CRC32C differ from their marker (reads every shard file)."""
    problems = [f"shard {s} not finished" for s in store.missing_shards()]
    for shard in sorted(store.done_shards()):
        problems += shard_file_problems(store.path, store.marker(shard))
    return problems


def shard_file_problems(store: Path, marker: dict) -> list[str]:
    """One line per file of a finished shard (its marker) that is missing or whose size or CRC32C differ."""
    problems = []
    for name, entry in marker["files"].items():
        path = Path(store) / entry["key"]
        if not path.is_file():
            problems.append(f"shard {marker['shard']}: {name} file {path} is missing")
        elif path.stat().st_size != entry["bytes"] or file_crc32c(path) != entry["crc32c"]:
            problems.append(f"shard {marker['shard']}: {name} file {path} does not match its checksum")
    return problems


class ShardedChunkReader:
    """Reads one inner chunk of a sharded Zarr v3 array straight from its shard file, synchronously.

    Why not `array[...]`: zarr-python 3 routes every read through its asyncio loop and thread hops, ~0.75 ms
    of CPU per chunk whatever its size, i.e. more than decompressing a 1.5 MiB lz4 chunk; the trainer reads
    five chunks per block of a few images, so that overhead alone would cap the feed below 2,000 images/s on
    two cores. This follows the sharding spec for the layout `StoreWriter.create` writes (index of
    (offset, nbytes) uint64 pairs at the end of the shard, CRC32C-checked; chunks bytes(little) + Blosc +
    CRC32C), checks each chunk's CRC32C (~0.2 ms per MiB, GIL released) and decompresses into the output array
    with the GIL released. `array[...]` stays the reference (tests).
    """

    def __init__(self, array: zarr.Array, array_path: Path):
        codecs = array.metadata.codecs
        sharding = codecs[0] if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None
        if (sharding is None or sharding.index_location != ShardingCodecIndexLocation.end
                or [type(c) for c in sharding.codecs] != [BytesCodec, BloscCodec, Crc32cCodec]
                or [type(c) for c in sharding.index_codecs] != [BytesCodec, Crc32cCodec]):
            raise StoreError(f"{array_path} is not laid out as `python -m cache_teacher run` writes it (sharded "
                             f"Blosc + CRC32C chunks); re-run the cache into a new --out folder")
        self.array, self.path, self.store = array, array_path, array_path.parent
        self.chunk_shape = tuple(sharding.chunk_shape)
        shard_shape = tuple(array.metadata.chunk_grid.chunk_shape)
        self.chunks_per_shard = tuple(s // c for s, c in zip(shard_shape, self.chunk_shape))
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.index_bytes = 16 * math.prod(self.chunks_per_shard) + 4  # + CRC32C
        self._indexes: dict[tuple[int, ...], np.ndarray] = {}  # shard -> [chunks..., 2]; shards never change
        self._files: dict[tuple[int, ...], Path] = {}  # shard -> its file (the key encoding costs µs per read)

    def _index(self, shard: tuple[int, ...], fd: int, file: Path) -> np.ndarray:
        index = self._indexes.get(shard)
        if index is None:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, self.index_bytes, size - self.index_bytes) if size >= self.index_bytes else b""
            if len(raw) != self.index_bytes or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise StoreError(f"{file}: shard index is damaged (CRC32C mismatch); {repair_hint(self.store)}")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.chunks_per_shard + (2,))
            self._indexes[shard] = index
        return index

    def read(self, chunk: tuple[int, ...]) -> np.ndarray:
        """The whole chunk at chunk-grid coordinates `chunk` (a chunk past the array's end is padded)."""
        shard = tuple(c // n for c, n in zip(chunk, self.chunks_per_shard))
        file = self._files.get(shard)
        if file is None:
            file = self._files[shard] = self.path / self.array.metadata.encode_chunk_key(shard)
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"{file} is missing; the store is damaged: {repair_hint(self.store)}") from None
        try:
            offset, nbytes = (int(v) for v in self._index(shard, fd, file)[tuple(
                c % n for c, n in zip(chunk, self.chunks_per_shard))])
            if offset == nbytes == 2 ** 64 - 1:
                raise StoreError(f"{file}: chunk {chunk} was never written; the store is damaged: "
                                 f"{repair_hint(self.store)}")
            data = os.pread(fd, nbytes, offset)
        finally:
            os.close(fd)
        payload = np.frombuffer(data, dtype=np.uint8)[:-4]
        if len(data) != nbytes or nbytes < 4 or google_crc32c.value(payload) != int.from_bytes(data[-4:], "little"):
            raise StoreError(f"{file}: chunk {chunk} is damaged (CRC32C mismatch); {repair_hint(self.store)}")
        out = np.empty(self.chunk_shape, self.dtype)
        try:
            numcodecs.blosc.decompress(payload, out)
        except (RuntimeError, ValueError) as exc:  # a damaged Blosc header or payload
            raise StoreError(f"{file}: chunk {chunk} does not decompress ({exc}); {repair_hint(self.store)}") from None
        return out


class TargetStore:
    """Read side: attributes, and block reads of one view set of `chunk_images` consecutive images (all arrays)."""

    def __init__(self, path: str | os.PathLike, option: str = "--store"):
        self.path = Path(path)
        self.attrs = read_attrs(self.path, option)
        check_format_version(self.attrs, self.path)
        check_spec_version(self.attrs, self.path)
        check_record_complete(self.attrs, self.path)
        group = _open_group(self.path, "r")
        self.layout = layout_from_attrs(self.attrs)
        try:
            self.arrays = {name: group[name] for name in self.layout.array_specs()}
        except KeyError as exc:
            raise StoreError(f"{self.path} lacks array {exc}; the store is damaged, re-run the cache") from None
        lead = (self.layout.num_images, self.layout.views_per_image)
        for name, (shape, _) in self.layout.array_specs().items():
            if self.arrays[name].shape != lead + shape:
                raise StoreError(f"{self.path}: array {name} has shape {self.arrays[name].shape} but the store's "
                                 f"attributes describe {lead + shape}; the store is damaged, re-run the cache")
        self.compact = read_compact_coding(self.path, self.attrs, self.layout)
        self.chunk_readers = {name: ShardedChunkReader(array, self.path / name) for name, array in self.arrays.items()}

    @property
    def num_images(self) -> int:
        return self.layout.num_images

    @property
    def chunk_images(self) -> int:
        return self.layout.chunk_images

    @property
    def views_per_image(self) -> int:
        return self.layout.views_per_image

    @property
    def target_format(self) -> str:
        return self.layout.target_format

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    @property
    def view_config(self) -> ViewConfig:
        return view_config_from_dict(self.attrs["view_config"])

    def done_shards(self) -> set[int]:
        folder = self.path / PROGRESS_DIR
        return {int(p.stem.split("_")[1]) for p in folder.glob("shard_*.json")} if folder.is_dir() else set()

    def missing_shards(self) -> list[int]:
        done = self.done_shards()
        return [s for s in range(self.layout.num_shards) if s not in done]

    def marker(self, shard: int) -> dict:
        return read_json(self.path / PROGRESS_DIR / f"shard_{shard:06d}.json")

    def require_complete(self) -> None:
        missing = self.missing_shards()
        if missing:
            raise StoreError(f"{self.path} is incomplete: {len(missing)} of {self.layout.num_shards} shards not "
                             f"written (first: {missing[:5]}); re-run the same `python -m cache_teacher run` "
                             f"command to finish it")

    def read_block(self, block_index: int, view_set: int) -> dict[str, np.ndarray]:
        """View set `view_set` of images [b * chunk_images, (b + 1) * chunk_images) (the last block may be
        shorter), every array as [images, ...]: exactly one chunk read per array."""
        if not 0 <= block_index < self.num_blocks:
            raise IndexError(f"block {block_index} out of range (store has {self.num_blocks} blocks)")
        if not 0 <= view_set < self.views_per_image:
            raise IndexError(f"view set {view_set} out of range (store has {self.views_per_image} per image)")
        rows = min(self.chunk_images, self.num_images - block_index * self.chunk_images)
        return {name: reader.read((block_index, view_set) + (0,) * (len(reader.chunk_shape) - 2))[:rows, 0]
                for name, reader in self.chunk_readers.items()}

    def targets(self, arrays: dict):
        """Read arrays of a batch -> its targets as the trainer stages them (`formats.targets.read_targets`)."""
        return read_targets(arrays, self.compact)

    def read_images(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: array[start:stop] for name, array in self.arrays.items()}

    def check_compatible(self, recipe: Recipe, views_cfg: ViewConfig, images_fingerprint: str,
                         backgrounds_fingerprint: str | None = None) -> None:
        """Refuse a store that was not made for this recipe's teacher, these views, this images file and (when
        given) this background pool: the stored view parameters index the pool they were drawn from, so
        another pool would silently give other crowd views than the teacher saw."""
        cached = (self.attrs.get("images_fingerprint"), self.attrs.get("backgrounds_fingerprint"))
        if backgrounds_fingerprint is not None and (backgrounds_fingerprint, images_fingerprint) == cached:
            raise StoreError(f"target store {self.path}: --images and --backgrounds are swapped (it was cached with "
                             f"--images {self.attrs.get('images_path')} --backgrounds "
                             f"{self.attrs.get('backgrounds_path')}); swap them back")
        expected = {"teacher": recipe.teacher.name, "teacher_spec": recipe.teacher, "view_config": views_cfg,
                    "images_fingerprint": images_fingerprint}
        problems = describe_differences(self.attrs, expected, set(expected) - {"images_fingerprint"})
        if self.attrs.get("images_fingerprint") != images_fingerprint:
            problems.append(f"the images file is not the one it was cached from ({self.attrs.get('images_path')}, "
                            f"fingerprint {self.attrs.get('images_fingerprint')}, this one {images_fingerprint}); "
                            f"pass that file as --images, or cache this one into a new store with "
                            f"`python -m cache_teacher run`")
        if backgrounds_fingerprint is not None and self.attrs.get("backgrounds_fingerprint") != backgrounds_fingerprint:
            problems.append(f"the background pool is not the one it was cached with "
                            f"({self.attrs.get('backgrounds_path')}); pass that file as --backgrounds")
        if self.attrs.get("view_params_version") != VIEW_PARAMS_VERSION:
            problems.append(f"view_params_version: store has {self.attrs.get('view_params_version')}, "
                            f"this code renders version {VIEW_PARAMS_VERSION}")
        if problems:
            raise StoreError(f"target store {self.path} does not fit recipe {recipe.name}: " + "; ".join(problems))


def read_compact_coding(path: Path, attrs: dict, layout: StoreLayout) -> CompactCoding | None:
    """A compact store's knobs and basis, the basis file checked against its recorded sha256 and shape."""
    if layout.compact is None:
        return None
    file = path / TOKEN_BASIS_FILE
    if not file.is_file():
        raise StoreError(f"{file} is missing: a compact store cannot be read without its token basis; re-run the "
                         f"cache into a new --out folder")
    if file_sha256(file) != attrs.get("token_basis_sha256"):
        raise StoreError(f"{file} does not match the sha256 recorded in the store: the basis is not the one its "
                         f"arrays were coded with; re-run the cache into a new --out folder")
    basis = TokenBasis.load(file)
    expected = (layout.compact.token_rank, layout.width)
    if (tuple(basis.rows.shape), tuple(basis.scales.shape), tuple(basis.mean.shape)) != (expected, expected[:1],
                                                                                          expected[1:]):
        raise StoreError(f"{file} holds a basis of shape {tuple(basis.rows.shape)} but the store records rank and "
                         f"width {expected}; re-run the cache into a new --out folder")
    return CompactCoding(layout.compact, basis)


def layout_from_attrs(attrs: dict) -> StoreLayout:
    compact = attrs.get("compact") if attrs.get("target_format") == "compact" else None
    if attrs.get("target_format") == "compact":
        if not isinstance(compact, dict) or set(compact) != {f.name for f in dataclasses.fields(CompactKnobs)}:
            raise StoreError(f"a compact store must record its knobs ({', '.join(CompactKnobs.__annotations__)}); "
                             f"it holds {compact!r}: the store is damaged, re-run the cache")
        compact = CompactKnobs(**compact)
        if problem := compact.problem(width=attrs["teacher_spec"]["width"], crowd_tokens=attrs["crowd_tokens"]):
            raise StoreError(f"store records {problem}; the store is damaged, re-run the cache")
    return StoreLayout(num_images=attrs["num_images"], views_per_image=attrs["views_per_image"],
                       view_fields=attrs["view_fields"], width=attrs["teacher_spec"]["width"],
                       tokens=attrs["token_grid"][0] * attrs["token_grid"][1], crowd_tokens=attrs["crowd_tokens"],
                       target_format=attrs["target_format"], chunk_images=attrs["chunk_images"],
                       shard_images=attrs["shard_images"], compact=compact)


def open_store(path: str | os.PathLike, *, require_complete: bool = True, option: str = "--store") -> TargetStore:
    """Open a store for reading; by default refuse one whose shards are not all finished. `option` names
    where the path came from, for the messages."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"target store {path} does not exist; create it with `python -m cache_teacher run`")
    store = TargetStore(path, option)
    if require_complete:
        store.require_complete()
    return store
