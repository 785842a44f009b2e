"""The compact target format end to end: real stores written by `cache_teacher run` with a small random-weight
ViT teacher, read back through the trainer's feed, checked by `verify` and `info`, and refused when bad."""
from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import torch

from cache_teacher.__main__ import main
from cache_teacher.fidelity import FIGURES, student_probe
from cache_teacher.run import RunConfig, RunError, run
from cache_teacher.verify import info, verify
from dpal.distill import distill_step_losses
from formats.store import TOKEN_BASIS_FILE, StoreError, open_store
from formats.targets import CompactTargets, TokenBasis
from formats.teacher_side import BackgroundPool
from train_student.data import FeedBatch, FeedPlan, TargetPrefetcher
from train_student.step import CachedTargets
from helpers import TEACHERS_WITH_TINY, TINY, write_packed_inputs

NUM_IMAGES = 4
CROWD_TOKENS = 257
LOSSLESS = dict(target_format="compact", token_rank=TINY.width, token_bits=16, relation_k=CROWD_TOKENS,
                relation_bits=16)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_packed_inputs(tmp_path_factory.mktemp("compact"), persons=NUM_IMAGES, backgrounds=3, seed=5,
                               workers=1, teacher_spec=TINY)


def _config(root, out: str, **changes) -> RunConfig:
    base = dict(teacher=TINY.name, weights=str(root / "tiny.pth"), images=str(root / "persons.beton"),
                backgrounds=str(root / "backgrounds.beton"), views_per_image=1, out=str(root / out),
                chunk_images=2, shard_images=2, calibration_images=NUM_IMAGES, batch_size=4, progress=False)
    return RunConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def stores(inputs):
    """A float16 store, a compact store at the lossless end of the knobs and one at the defaults."""
    made = {}
    for name, changes in (("float16", {}), ("lossless", LOSSLESS), ("compact", {"target_format": "compact"})):
        run(_config(inputs, f"{name}.zarr", **changes), teachers=TEACHERS_WITH_TINY)
        made[name] = open_store(inputs / f"{name}.zarr")
    return made


def _block(store, block: int = 0):
    return store.targets({n: v for n, v in store.read_block(block, 0).items() if n != "view_params"})


def test_lossless_knobs_reproduce_float16_within_its_rounding(stores):
    reference, coded = _block(stores["float16"]).decoded(), _block(stores["lossless"])
    assert isinstance(coded, CompactTargets)
    decoded = coded.decoded()
    local, relation = reference.local_target, reference.relation_target
    # a float16 rounding of each token: half a unit in the last place of its largest entry
    half_ulp = local.abs().amax(-1, keepdim=True) * 2.0 ** -11
    assert torch.all((decoded.local_target - local).abs() <= 2 * half_ulp)
    assert not torch.equal(decoded.local_target, local)  # coded on the basis, not copied
    assert torch.equal(decoded.relation_target, relation)  # every entry kept, in float16
    assert torch.equal(decoded.global_target, reference.global_target)
    assert torch.equal(decoded.local_mask, reference.local_mask)


def test_trainer_feed_gives_the_same_losses_from_float16_and_lossless_compact(stores, inputs):
    student, decoder, recipe = student_probe(TINY)
    views = {"global_view": torch.rand(2, 3, 256, 128), "local_views": torch.rand(2, 1, 3, 128, 96),
             "crowd_view": torch.rand(2, 3, 256, 256)}
    losses = {}
    for name in ("float16", "lossless"):
        store = stores[name]
        plan = FeedPlan(num_images=store.num_images, chunk_images=store.chunk_images, micro_batch=2, world_size=1,
                        rank=0, accum_steps=1, seed=0, window_images=4)
        feed = TargetPrefetcher(store, plan, store.view_config, BackgroundPool(inputs / "backgrounds.beton"), 0, 0,
                                pin=False)
        try:
            item = feed.get()
        finally:
            feed.close()
        batch = FeedBatch(item["indices"], [], item["backgrounds"], item["view_params"], item["local_params"],
                          item["targets"])
        staged = CachedTargets().stage(batch, torch.device("cpu"))  # what the step receives
        with torch.no_grad():
            losses[name] = distill_step_losses(student, decoder, recipe.teacher, **views, **staged,
                                               moe_loss_weight=0.1)
    for term in ("global", "local", "relation", "total"):
        lossless, float16 = (losses[name].by_name()[term] for name in ("lossless", "float16"))
        assert float(lossless) == pytest.approx(float(float16), rel=1e-4), term


def test_default_knobs_fit_and_report_fidelity(stores, inputs, capsys):
    store = stores["compact"]
    per_set = store.layout.bytes_per_view_set()
    assert per_set["local"] == 128 * TINY.width  # the default rank, clipped to the width
    assert store.attrs["compact"] == {"token_rank": TINY.width, "token_bits": 8, "relation_k": CROWD_TOKENS,
                                      "relation_bits": 4}
    assert per_set["relation"] == CROWD_TOKENS * 129  # two 4-bit codes a byte
    assert sum(per_set.values()) < sum(stores["float16"].layout.bytes_per_view_set().values()) / 3
    recorded = store.attrs["fidelity"]
    assert set(recorded) == set(FIGURES)
    assert recorded["relation_kept_mass"]["worst"] == 1  # every entry kept
    assert 0 < recorded["relation_kl"]["worst"] < 0.05
    assert recorded["local_cosine"]["worst"] > 0.99
    summary = info(str(store.path))
    out = capsys.readouterr().out
    assert "compact knobs: token rank 32 of 32 in 8 bits, relation k 257 of 257 in 4 bits" in out
    assert "loss_change_relation" in out and summary["fidelity"] == recorded
    passed, table = verify(str(store.path), str(inputs / "tiny.pth"), samples=2, teachers=TEACHERS_WITH_TINY)
    assert passed
    figures = {row["metric"]: row for row in table}
    assert figures["fidelity_relation_kept_mass"]["worst"] == 1
    assert 0 < figures["fidelity_relation_kl"]["worst"] < 0.05 and figures["fidelity_local_cosine"]["worst"] > 0.99


def test_loss_budget_refuses_knobs_before_writing(inputs):
    cfg = _config(inputs, "over.zarr", target_format="compact", token_rank=2, relation_k=1, max_loss_change=1e-4)
    with pytest.raises(RunError, match=r"loss_change_\w+ = \S+ exceeds --max-loss-change 0.0001 .*nothing was "
                                       r"written"):
        run(cfg, teachers=TEACHERS_WITH_TINY)
    assert not (inputs / "over.zarr").exists()


@pytest.mark.parametrize("knobs, message", [
    (["--token-rank", "33"], r"token rank 33 is out of range: must be 1..32 \(the teacher's token width\)"),
    (["--relation-k", "258"], r"relation k 258 is out of range: must be 1..257 \(the crowd view's token count\)"),
])
def test_knobs_out_of_range_are_refused_in_one_line(inputs, capsys, knobs, message):
    cfg = _config(inputs, "bad.zarr")
    argv = ["run", "--teacher", TINY.name, "--weights", cfg.weights, "--images", cfg.images, "--backgrounds",
            cfg.backgrounds, "-K", "1", "--out", cfg.out, "--format", "compact", "--no-progress", *knobs]
    assert main(argv, teachers=TEACHERS_WITH_TINY) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (inputs / "bad.zarr").exists()


def test_bits_are_checked_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--teacher", "path-b", "--weights", "w", "--images", "i", "--backgrounds", "b", "-K", "1",
              "--out", "o", "--relation-bits", "2"])
    assert "invalid choice: 2 (choose from 4, 8, 16)" in capsys.readouterr().err


def test_a_basis_that_does_not_match_the_store_is_refused(stores, inputs, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(stores["compact"].path, copy)
    basis = TokenBasis.load(copy / TOKEN_BASIS_FILE)  # one direction fewer than the arrays were coded with
    TokenBasis(basis.mean, basis.rows[:-1], basis.scales[:-1]).save(copy / TOKEN_BASIS_FILE)
    with pytest.raises(StoreError, match=r"token_basis.npz does not match the sha256 recorded in the store"):
        open_store(copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["dpal_store"]["token_basis_sha256"] = hashlib.sha256(
        (copy / TOKEN_BASIS_FILE).read_bytes()).hexdigest()
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"holds a basis of shape \(31, 32\) but the store records rank and width "
                                         r"\(32, 32\)"):
        open_store(copy)


def test_a_newer_store_format_asks_for_newer_code(stores, tmp_path):
    copy = tmp_path / "newer.zarr"
    shutil.copytree(stores["compact"].path, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["dpal_store"]["format_version"] += 1
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"by a newer version of this code, which reads format \d+; update the code"):
        open_store(copy)


def test_dry_run_prints_scale_and_the_fidelity_of_the_knobs(inputs, capsys):
    result = run(_config(inputs, "dry.zarr", target_format="compact", token_rank=8, relation_k=16, dry_run=True,
                         plan_gpus=8, plan_rate=1000.0), teachers=TEACHERS_WITH_TINY)
    out = capsys.readouterr().out
    assert not (inputs / "dry.zarr").exists()
    rows = {row["format"]: row for row in result["scale"]}
    assert rows["float16"]["bytes_per_second"] == rows["float16"]["bytes_per_view_set"] * 8 * 1000
    assert rows["compact"]["bytes_per_view_set"] < rows["int8"]["bytes_per_view_set"] < rows["float16"][
        "bytes_per_view_set"]
    assert rows["compact"]["knobs"] == {"token_rank": 8, "token_bits": 8, "relation_k": 16, "relation_bits": 8}
    assert "read at 8 GPUs x 1000/s" in out and "loss_change_local" in out
    assert result["fidelity"]["relation_kept_mass"]["worst"] < 1


def test_feed_bench_reports_each_format(stores, inputs, tmp_path, capsys):
    from train_student.feed_bench import main as feed_bench

    out = tmp_path / "feed.json"
    argv = ["--backgrounds", str(inputs / "backgrounds.beton"), "--batch-size", "2", "--batches", "2",
            "--warmup-batches", "1", "--device", "cpu", "--json", str(out)]
    for name in ("float16", "compact"):
        argv += ["--store", str(stores[name].path)]
    assert feed_bench(argv) == 0
    rows = {row["format"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["compact"]["raw_bytes_per_view_set"] < rows["float16"]["raw_bytes_per_view_set"] / 2
    for row in rows.values():
        assert row["feed_samples_per_s"] > 0 and row["feed_and_stage_samples_per_s"] > 0
        assert row["feed_bytes_per_s"] == pytest.approx(row["feed_samples_per_s"] * row["stored_bytes_per_view_set"])
        assert row["staged_arrays"] == ["global_target", "local_mask", "local_target", "relation_target"]
    assert "feed samples/s" in capsys.readouterr().out
