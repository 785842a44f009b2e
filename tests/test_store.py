"""formats.store: layout planning, int8 rows, atomic creation, durable shards, reader refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpal.config import TeacherSpec, ViewConfig
from dpal.losses import dequantize_rows, quantize_rows
from dpal.recipes import TEACHERS, get_recipe
from dpal.views import VIEW_PARAMS_VERSION
from formats.targets import CompactTargets, Targets
from formats.run_spec import spec_dict
from formats.schema import CompactKnobs, array_fields
from formats.store import (ATTRS_KEY, MIN_CHUNK_BYTES, SPEC_VERSION, STORE_FORMAT_VERSION, StoreError, StoreWriter,
                           open_store, plan_layout)

SMALL = TeacherSpec("small-vit", "vit", "vit_base_patch16_224", width=16, depth=1, num_heads=1, patch_size=16,
                    token_stride=16, has_cls=True)


@pytest.mark.parametrize("teacher", ["path-b", "path-l", "solider-b"])
@pytest.mark.parametrize("target_format", ["float16", "int8"])
def test_default_chunks_are_at_least_1mib_of_one_view_set(teacher, target_format):
    layout = plan_layout(TEACHERS[teacher], ViewConfig(), num_images=1000, views_per_image=3, view_fields=57,
                         target_format=target_format)
    local = layout.bytes_per_view_set()["local"]  # a chunk holds one view set of chunk_images images
    assert layout.chunk_images * local >= MIN_CHUNK_BYTES
    assert (layout.chunk_images // 2) * local < MIN_CHUNK_BYTES  # smallest such power of two
    assert layout.shard_images % layout.chunk_images == 0
    if teacher == "path-b":
        assert layout.tokens == 128 and layout.crowd_tokens == 257 and layout.width == 768
    if teacher == "solider-b":
        assert layout.tokens == 32 and layout.crowd_tokens == 64


def test_bad_layout_arguments():
    with pytest.raises(StoreError, match="views-per-image"):
        plan_layout(SMALL, ViewConfig(), num_images=4, views_per_image=0, view_fields=57, target_format="float16")
    with pytest.raises(StoreError, match="unknown target format"):
        plan_layout(SMALL, ViewConfig(), num_images=4, views_per_image=1, view_fields=57, target_format="bf16")
    with pytest.raises(StoreError, match="multiple of chunk_images"):
        plan_layout(SMALL, ViewConfig(), num_images=4, views_per_image=1, view_fields=57, target_format="int8",
                    chunk_images=2, shard_images=3)


# A store's arrays in the order it lists them (marker files name them in it), as store format 5 writes them for
# PATH-B (768 wide, 128 patch tokens, 257 crowd tokens; 57 record fields, as in the tests above).
PATH_B_ARRAYS = {
    "float16": [("view_params", (57,), "float32"), ("global", (768,), "float16"), ("local", (128, 768), "float16"),
                ("mask", (128,), "float16"), ("relation", (257, 257), "float16")],
    "int8": [("view_params", (57,), "float32"), ("global", (768,), "float16"), ("local", (128, 768), "int8"),
             ("mask", (128,), "float16"), ("relation", (257, 257), "int8"), ("local_scale", (128,), "float32"),
             ("relation_scale", (257,), "float32")],
    "compact": [("view_params", (57,), "float32"), ("global", (768,), "float16"), ("mask", (128,), "float16"),
                ("local", (128, 96), "int8"), ("local_scale", (128,), "float32"), ("relation", (257, 33), "uint8"),
                ("relation_scale", (257,), "float32"), ("relation_index", (257, 65), "int16"),
                ("relation_rest", (257,), "float32")],
}


@pytest.mark.parametrize("target_format", list(PATH_B_ARRAYS))
def test_the_schema_table_lays_out_the_arrays_of_store_format_5(target_format):
    layout = plan_layout(TEACHERS["path-b"], ViewConfig(), num_images=8, views_per_image=2, view_fields=57,
                         target_format=target_format,
                         compact=CompactKnobs(96, 8, 65, 4) if target_format == "compact" else None)
    assert [(name, shape, dtype) for name, (shape, dtype) in layout.array_specs().items()] == \
        PATH_B_ARRAYS[target_format]


def test_every_field_the_table_names_is_a_field_of_its_coding():
    assert set(array_fields("int8").values()) == {"global_target", "local_target", "local_mask", "relation_target",
                                                   "local_scale", "relation_scale"} == set(Targets.__annotations__)
    assert set(array_fields("float16").values()) < set(array_fields("int8").values())
    assert set(array_fields("compact").values()) == set(CompactTargets.__annotations__) - {"coding"}


@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 257), (1, 1)])
def test_int8_rows_roundtrip_within_half_a_step(shape):
    values = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10
    values[..., 0] = 0
    q, scale = quantize_rows(values)
    assert q.dtype == torch.int8 and scale.shape == shape[:-1]
    error = (dequantize_rows(q, scale) - values).abs()
    assert (error <= scale[..., None] / 2 + 1e-6).all()
    zeros_q, zeros_scale = quantize_rows(torch.zeros(2, 4))
    assert (zeros_q == 0).all() and (zeros_scale == 0).all()


def _attrs(layout, **changes):
    attrs = {"format_version": STORE_FORMAT_VERSION, "spec_version": SPEC_VERSION,
             "view_params_version": VIEW_PARAMS_VERSION, "teacher": SMALL.name,
             "teacher_spec": spec_dict(SMALL), "view_config": spec_dict(ViewConfig()),
             "images_fingerprint": "abc", "num_images": layout.num_images, "views_per_image": layout.views_per_image,
             "target_format": layout.target_format, "token_grid": [16, 8], "crowd_tokens": layout.crowd_tokens,
             "view_fields": layout.view_fields, "chunk_images": layout.chunk_images,
             "shard_images": layout.shard_images, "checkpoint_sha256": "0" * 64, "teacher_options": {},
             "teacher_precision": "float32", "backgrounds_fingerprint": "def", "num_backgrounds": 3, "seed": 0,
             "calibration_images": 2, "batch_size": 2, "codec": "lz4", "mask_calibration": {},
             "images_path": "/images.beton", "backgrounds_path": "/backgrounds.beton", "store_id": "1" * 32,
             "compact": None}
    return {**attrs, **changes}


def _rows(layout, start, stop, seed):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=(stop - start, layout.views_per_image) + shape).astype(dtype)
            for name, (shape, dtype) in layout.array_specs().items()}


def test_store_write_read_blocks_and_completion(tmp_path):
    layout = plan_layout(SMALL, ViewConfig(), num_images=7, views_per_image=2, view_fields=57,
                         target_format="int8", chunk_images=2, shard_images=4)
    writer = StoreWriter.create(tmp_path / "s.zarr", _attrs(layout), layout)
    assert not list(tmp_path.glob("*.creating-*"))
    with pytest.raises(StoreError, match="incomplete: 2 of 2 shards"):
        open_store(tmp_path / "s.zarr")
    first = _rows(layout, 0, 4, 0)
    writer.write_shard(0, first)
    with pytest.raises(StoreError, match="incomplete: 1 of 2"):
        open_store(tmp_path / "s.zarr")
    last = _rows(layout, 4, 7, 1)
    writer.write_shard(1, last)
    marker = json.loads((tmp_path / "s.zarr" / "dpal_progress" / "shard_000001.json").read_text())
    assert marker["images"] == [4, 7] and set(marker["files"]) == set(layout.array_specs())
    store = open_store(tmp_path / "s.zarr")
    assert store.num_blocks == 4 and store.chunk_images == 2
    block = store.read_block(3, 1)  # the short last block
    assert all(v.shape[0] == 1 for v in block.values())
    for name in layout.array_specs():
        assert np.array_equal(store.read_block(1, 0)[name], first[name][2:4, 0])
        assert np.array_equal(block[name], last[name][2:3, 1])
    assert store.arrays["local"].dtype == np.int8 and "relation_scale" in store.arrays
    with pytest.raises(IndexError, match="block 4 out of range"):
        store.read_block(4, 0)
    with pytest.raises(IndexError, match="view set 2 out of range"):
        store.read_block(0, 2)


def test_block_read_returns_exactly_the_view_set_asked_for(tmp_path):
    layout = plan_layout(SMALL, ViewConfig(), num_images=10, views_per_image=3, view_fields=57,
                         target_format="float16", chunk_images=4, shard_images=8)
    assert layout.num_shards == 2 and layout.num_blocks == 3  # blocks span shards; the last one is short
    writer = StoreWriter.create(tmp_path / "s.zarr", _attrs(layout), layout)
    rows = [_rows(layout, *layout.shard_range(shard), seed=shard) for shard in range(2)]
    for shard in range(2):
        writer.write_shard(shard, rows[shard])
    written = {name: np.concatenate([part[name] for part in rows]) for name in layout.array_specs()}
    # each view set of each image differs from the others, so a wrong set or row cannot go unnoticed
    assert all(not np.array_equal(written["local"][i, a], written["local"][i, b])
               for i in range(10) for a in range(3) for b in range(a))
    store = open_store(tmp_path / "s.zarr")
    for block in range(3):
        start, stop = block * 4, min(block * 4 + 4, 10)
        for view_set in range(3):
            got = store.read_block(block, view_set)
            assert set(got) == set(layout.array_specs())
            for name, array in store.arrays.items():
                assert got[name].dtype == array.dtype
                assert np.array_equal(got[name], written[name][start:stop, view_set])
                assert np.array_equal(got[name], array[start:stop, view_set])  # zarr's own read agrees
    # the store really is view-set-major: one chunk holds one view set
    assert store.arrays["local"].chunks == (4, 1) + layout.array_specs()["local"][0]


def test_reader_refuses_mismatch_old_format_and_foreign_folders(tmp_path):
    layout = plan_layout(SMALL, ViewConfig(), num_images=2, views_per_image=1, view_fields=57,
                         target_format="float16", chunk_images=2, shard_images=2)
    writer = StoreWriter.create(tmp_path / "s.zarr", _attrs(layout), layout)
    writer.write_shard(0, _rows(layout, 0, 2, 0))
    store = open_store(tmp_path / "s.zarr")
    recipe = get_recipe("path-b_vit-ti")
    with pytest.raises(StoreError, match="teacher: store has 'small-vit', this run has 'path-b'"):
        store.check_compatible(recipe, ViewConfig(), "abc")
    with pytest.raises(StoreError, match=r"the images file is not the one it was cached from \(/images.beton, "
                                         r"fingerprint abc, this one other\); pass that file as --images"):
        store.check_compatible(recipe, ViewConfig(), "other")
    with pytest.raises(StoreError, match=r"view_config differs in gray_p \(store 0.2, this run 0.5\)"):
        store.check_compatible(recipe, ViewConfig(gray_p=0.5), "abc")
    old = StoreWriter.create(tmp_path / "old.zarr", _attrs(layout, format_version=STORE_FORMAT_VERSION - 1), layout)
    old.write_shard(0, _rows(layout, 0, 2, 0))
    with pytest.raises(StoreError, match=rf"store format {STORE_FORMAT_VERSION - 1}; this version reads format "
                                         rf"{STORE_FORMAT_VERSION} .*Re-run `python -m cache_teacher run`"):
        open_store(tmp_path / "old.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="--store .*plain is not a Zarr store .*pass as --store a store folder"):
        open_store(tmp_path / "plain")
    (tmp_path / "images.beton").write_bytes(b"x")
    with pytest.raises(StoreError, match="STORE .*images.beton is a file, not a store folder; pass as STORE a store"):
        open_store(tmp_path / "images.beton", option="STORE")
    for key in ("store_id", "checkpoint_sha256", "mask_calibration"):
        damaged = StoreWriter.create(tmp_path / f"no-{key}.zarr", {k: v for k, v in _attrs(layout).items() if k != key},
                                     layout)
        damaged.write_shard(0, _rows(layout, 0, 2, 0))
        with pytest.raises(StoreError, match=f"no-{key}.zarr lacks {key} in its record .*edited or damaged"):
            open_store(tmp_path / f"no-{key}.zarr", require_complete=False)
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "missing.zarr")
    meta = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    del meta["attributes"][ATTRS_KEY]
    (tmp_path / "s.zarr" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="not a DPAL target store"):
        open_store(tmp_path / "s.zarr")


def test_store_of_an_older_spec_is_refused_with_one_line_saying_to_rebuild(tmp_path):
    """Spec v2 changed the teacher's position-embedding resize, spec v3 the crop boxes of the views: every
    target of an older store differs, none may be read."""
    layout = plan_layout(SMALL, ViewConfig(), num_images=3, views_per_image=2, view_fields=57,
                         target_format="int8", chunk_images=2, shard_images=2)
    path = tmp_path / "s.zarr"
    writer = StoreWriter.create(path, _attrs(layout), layout)
    for shard in range(layout.num_shards):
        writer.write_shard(shard, _rows(layout, *layout.shard_range(shard), seed=shard))
    assert open_store(path).attrs["spec_version"] == SPEC_VERSION == 3
    meta = json.loads((path / "zarr.json").read_text())
    for version, why in ((1, "old teacher position-embedding resize"),
                         (2, "view records v1: crop boxes shrunk to fit instead of redrawn, positions rounded")):
        meta["attributes"][ATTRS_KEY]["spec_version"] = version
        (path / "zarr.json").write_text(json.dumps(meta))
        for require_complete in (True, False):
            with pytest.raises(StoreError) as error:
                open_store(path, require_complete=require_complete)
            message = str(error.value)
            assert "\n" not in message and str(path) in message
            assert f"written under spec v{version} ({why})" in message
            assert "Rebuild it with `python -m cache_teacher run`" in message


def test_every_bit_flip_in_a_shard_file_is_caught_on_read_and_names_the_file(tmp_path):
    """Chunks carry their CRC32C and the shard index its own: no flipped bit anywhere in a shard file reads back
    as data (the trainer's reader checks each chunk it reads; before, 332 of 333 flips went unnoticed)."""
    layout = plan_layout(SMALL, ViewConfig(), num_images=4, views_per_image=2, view_fields=57,
                         target_format="float16", chunk_images=2, shard_images=4)
    writer = StoreWriter.create(tmp_path / "s.zarr", _attrs(layout), layout)
    writer.write_shard(0, _rows(layout, 0, 4, 0))
    shard = writer.shard_files(0)["global"]
    original = shard.read_bytes()
    positions = np.unique(np.linspace(0, len(original) * 8 - 1, 97).astype(int))
    for bit in positions:
        damaged = bytearray(original)
        damaged[bit // 8] ^= 1 << (bit % 8)
        shard.write_bytes(bytes(damaged))
        store = open_store(tmp_path / "s.zarr")  # fresh reader: no cached shard index
        with pytest.raises(StoreError, match=rf"{shard}: .*(damaged|never written).*re-running the "
                                             r"`python -m cache_teacher run` command"):
            for block in range(store.num_blocks):
                for view_set in range(store.views_per_image):
                    store.read_block(block, view_set)
    shard.write_bytes(original)
    store = open_store(tmp_path / "s.zarr")
    assert all(np.array_equal(store.read_block(b, v)["global"], store.arrays["global"][2 * b:2 * b + 2, v])
               for b in range(2) for v in range(2))
