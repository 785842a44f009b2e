"""train_student on real artefacts: a packed .beton and a store written by `cache_teacher run` (the
`train_artefacts` fixture), the one-process run and its exports, int8 and compact stores, refusals, bench.
Runs killed, signalled, contended and distributed are in tests/test_train_processes.py.

Everything is tiny (6 images, 2 view sets, global batch 2, a few steps) but runs the real code paths.
"""
import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from helpers import (TRAIN_IMAGES, TRAIN_STEPS, compared_columns, run_python, tiny_cache_args, tiny_train_args,
                     train_refusal)
from train_student.__main__ import main
from train_student.metrics import read_metrics

# FFCV's JIT-compiled JPEG decoder trips a harmless numba finalizer KeyError when collected in-process.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

@pytest.mark.e2e
def test_run_logs_every_step_and_exports_timm_students(reference_run):
    import timm

    import dpal  # noqa: F401  (registers the students with timm)

    rows = read_metrics(reference_run / "metrics.csv")
    assert [row["step"] for row in rows] == list(range(1, TRAIN_STEPS + 1))
    assert [row["epoch"] for row in rows] == [0, 0, 0, 1]  # 6 images / batch 2 = 3 steps per epoch
    assert np.isfinite(compared_columns(reference_run / "metrics.csv")).all()
    assert rows[0]["lr"] == 1e-3 and rows[1]["lr"] < 1e-3  # no warm-up: the cosine from the first step
    assert all(0 <= row["data_wait_share"] <= 1 and row["samples_per_s"] > 0 for row in rows)
    assert (reference_run / "loss.png").stat().st_size > 10_000
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))

    state = torch.load(reference_run / "checkpoint.pt", weights_only=True)
    assert state["step"] == TRAIN_STEPS
    # --keep-checkpoints 2 (saved at steps 2 and 4): the newest is checkpoint.pt itself, linked
    kept = sorted(path.name for path in reference_run.glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00000002.pt", f"checkpoint-{TRAIN_STEPS:08d}.pt"]
    assert (reference_run / kept[-1]).samefile(reference_run / "checkpoint.pt")
    assert torch.load(reference_run / kept[0], weights_only=True)["step"] == 2
    images = torch.randn(2, 3, 256, 128)
    for name, key in (("student", "student"), ("student_ema", "student_ema")):
        model = timm.create_model(f"local-dir:{reference_run / name}")
        backbone = {k[len("backbone."):]: v for k, v in state[key].items() if k.startswith("backbone.")}
        for param_name, value in model.state_dict().items():
            assert torch.equal(value, backbone[param_name]), (name, param_name)
        program = torch.export.load(str(reference_run / name / "model.pt2")).module()
        with torch.no_grad():
            features = model.forward_features(images)
            assert torch.isfinite(features).all()
            torch.testing.assert_close(program(images), features, rtol=1e-5, atol=1e-5)
    ema_differs = any(not torch.equal(state["student"][k], state["student_ema"][k]) for k in state["student"])
    assert ema_differs


@pytest.mark.e2e
def test_int8_store_trains_like_the_float16_store(train_artefacts, reference_run, tmp_path):
    """Same teacher, views and data order; only the target format differs. The first step's losses
    agree up to int8 rounding (local: half a step per value; relation: log-domain codes)."""
    from cache_teacher.__main__ import main as cache_main

    store = tmp_path / "int8.zarr"
    assert cache_main(tiny_cache_args(train_artefacts, store, "--format", "int8")) == 0
    out = tmp_path / "int8_run"
    done = run_python("-m", "train_student", *tiny_train_args(train_artefacts, out, "--max-steps", "1", store=store))
    assert done.returncode == 0, done.stderr
    (int8_row,), float16_row = read_metrics(out / "metrics.csv"), read_metrics(reference_run / "metrics.csv")[0]
    assert int8_row["global"] == float16_row["global"] and int8_row["moe"] == float16_row["moe"]
    assert int8_row["local"] == pytest.approx(float16_row["local"], rel=1e-2)
    assert int8_row["relation"] == pytest.approx(float16_row["relation"], rel=1e-2)
    assert int8_row["relation"] != float16_row["relation"]  # the int8 targets were really read


@pytest.mark.e2e
def test_a_lossless_compact_store_trains_like_the_float16_store(train_artefacts, reference_run, tmp_path):
    """The compact format at its lossless knobs, decoded where the step's targets are staged, gives the float16
    store's first-step losses: the step itself does not change with the format."""
    from cache_teacher.__main__ import main as cache_main

    store = tmp_path / "compact.zarr"
    assert cache_main(tiny_cache_args(train_artefacts, store, "--format", "compact", "--token-rank", "768",
                                      "--token-bits", "16", "--relation-k", "257", "--relation-bits", "16")) == 0
    out = tmp_path / "compact_run"
    done = run_python("-m", "train_student", *tiny_train_args(train_artefacts, out, "--max-steps", "1", store=store))
    assert done.returncode == 0, done.stderr
    (compact_row,), float16_row = read_metrics(out / "metrics.csv"), read_metrics(reference_run / "metrics.csv")[0]
    for term in ("global", "local", "relation", "moe"):
        assert compact_row[term] == pytest.approx(float16_row[term], rel=1e-4), term


def test_refusals_name_the_problem(train_artefacts, tmp_path, capsys):
    args = tiny_train_args(train_artefacts, tmp_path / "a")
    args[args.index("--recipe") + 1] = "path-l_vit-ti"
    status, err = train_refusal(capsys, args)
    assert status == 2 and "path-l" in err and "teacher" in err
    assert not (tmp_path / "a").exists()  # nothing written for a refused run

    args = tiny_train_args(train_artefacts, tmp_path / "b")
    args[args.index("--backgrounds") + 1] = str(train_artefacts["images"])
    status, err = train_refusal(capsys, args)
    assert status == 2 and "background pool" in err

    missing = tmp_path / "missing.zarr"
    status, err = train_refusal(capsys, tiny_train_args(train_artefacts, tmp_path / "c", store=missing))
    assert status == 2 and "missing.zarr" in err and "does not exist" in err

    unfinished = tmp_path / "unfinished.zarr"
    shutil.copytree(train_artefacts["store"], unfinished)
    for marker in (unfinished / "dpal_progress").glob("shard_*.json"):
        marker.unlink()
    status, err = train_refusal(capsys, tiny_train_args(train_artefacts, tmp_path / "d", store=unfinished))
    assert status == 2 and "incomplete" in err

    spec_v1 = tmp_path / "spec_v1.zarr"  # targets of the old teacher position-embedding resize
    shutil.copytree(train_artefacts["store"], spec_v1)
    meta = json.loads((spec_v1 / "zarr.json").read_text())
    meta["attributes"]["dpal_store"]["spec_version"] = 1
    (spec_v1 / "zarr.json").write_text(json.dumps(meta))
    status, err = train_refusal(capsys, tiny_train_args(train_artefacts, tmp_path / "d1", store=spec_v1))
    assert status == 2 and len(err.strip().splitlines()) == 1 and "spec_v1.zarr was written under spec v1" in err
    assert "Rebuild it with `python -m cache_teacher run`" in err and not (tmp_path / "d1").exists()

    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(train_artefacts["images"].read_bytes()[:5000])
    args = tiny_train_args(train_artefacts, tmp_path / "e")
    args[args.index("--images") + 1] = str(truncated)
    status, err = train_refusal(capsys, args)
    assert status == 2 and "truncated.beton" in err

    status, err = train_refusal(capsys, tiny_train_args(train_artefacts, tmp_path / "f", "--accum-steps", "4"))
    assert status == 2 and "not divisible" in err

    with pytest.raises(SystemExit):
        main(["--recipe", "nope"])
    assert "path-b_vit-ti" in capsys.readouterr().err


@pytest.mark.parametrize("poisoned_step", [3, 2])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(train_artefacts, tmp_path, capsys, poisoned_step):
    """The host reads a step's values one step late. Step 3 poisoned: found at step 4, the checkpoint of step
    2 is kept. Step 2 poisoned, a checkpoint step: its values are settled before saving, so no checkpoint is
    written after the bad step (and none before it: nothing of the run is kept)."""
    from train_student.data import FeedPlan

    store = tmp_path / "poisoned.zarr"
    shutil.copytree(train_artefacts["store"], store)
    plan = FeedPlan(num_images=TRAIN_IMAGES, chunk_images=2, micro_batch=2, world_size=1, rank=0, accum_steps=1,
                    seed=0, window_images=1024)
    poisoned = plan.rank_order(0)[2 * (poisoned_step - 1):2 * poisoned_step]
    targets = zarr.open_array(store / "global", mode="r+")
    for image in poisoned:
        targets[int(image)] = np.full(targets.shape[1:], np.nan, dtype=targets.dtype)

    out = tmp_path / "nan"
    status, err = train_refusal(capsys, tiny_train_args(train_artefacts, out, store=store))
    assert status == 2 and f"not finite at step {poisoned_step}" in err
    if poisoned_step == 3:
        assert "step 2) is kept" in err
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
        assert not (out / "student").exists()
    else:
        assert "no checkpoint had been written yet" in err and not (out / "checkpoint.pt").exists()


def test_bench_compares_cached_and_online_steps_and_the_feed(train_artefacts, tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", "--recipe", "path-b_vit-ti", "--store", str(train_artefacts["store"]), "--images",
                 str(train_artefacts["images"]), "--backgrounds", str(train_artefacts["backgrounds"]),
                 "--teacher-weights", train_artefacts["weights"], "--batch-size", "2", "--steps", "1",
                 "--warmup-steps", "0",
                 "--feed-batches", "6", "--calibration-images", "2", "--workers", "1", "--out", str(report)]) == 0
    result = json.loads(report.read_text())
    for key in ("feed_samples_per_s", "cached_step_samples_per_s", "staged_step_samples_per_s",
                "online_step_samples_per_s", "live_step_samples_per_s", "render_share"):
        assert result[key] > 0
    assert result["cached_vs_staged"] == pytest.approx(result["cached_step_samples_per_s"]
                                                       / result["staged_step_samples_per_s"])
    assert result["speedup"] == pytest.approx(result["cached_step_samples_per_s"] / result["online_step_samples_per_s"])
    assert "samples/s" in capsys.readouterr().out
    missing = tmp_path / "missing.zarr"
    assert main(["bench", "--recipe", "path-b_vit-ti", "--store", str(missing), "--images",
                 str(train_artefacts["images"]), "--backgrounds", str(train_artefacts["backgrounds"]),
                 "--feed-only"]) == 2
    assert f"error: target store {missing} does not exist" in capsys.readouterr().err  # one line, no traceback


def _damage_every_chunk(shard_file, damage):
    """damage(data, offset, nbytes) applied to each chunk of a shard file in place, found through the shard
    index (which is left intact)."""
    data = bytearray(shard_file.read_bytes())
    meta = json.loads((shard_file.parents[3] / "zarr.json").read_text())  # ARRAY/c/i/j/k
    inner = meta["codecs"][0]["configuration"]["chunk_shape"]
    chunks = int(np.prod([s // c for s, c in zip(meta["chunk_grid"]["configuration"]["chunk_shape"], inner)]))
    index = np.frombuffer(bytes(data[-(16 * chunks + 4):-4]), dtype="<u8").reshape(chunks, 2)
    for offset, nbytes in index:
        damage(data, int(offset), int(nbytes))
    shard_file.write_bytes(bytes(data))


def _flip_a_bit_in_every_chunk(shard_file):
    """Damage each chunk of a shard file once, in its payload, leaving the (CRC-checked) shard index intact."""
    def flip(data, offset, nbytes):
        data[offset + nbytes // 2] ^= 0x04
    _damage_every_chunk(shard_file, flip)


def test_a_damaged_store_chunk_stops_training_naming_the_file(train_artefacts, tmp_path, capsys):
    store = tmp_path / "damaged.zarr"
    shutil.copytree(train_artefacts["store"], store)
    shard = store / "global" / "c" / "0" / "0" / "0"
    _flip_a_bit_in_every_chunk(shard)
    status, err = train_refusal(capsys, tiny_train_args(train_artefacts, tmp_path / "run", store=store))
    assert status == 2 and err.count("\n") == 1
    assert f"{shard}: chunk" in err and "is damaged (CRC32C mismatch)" in err
    assert f"re-running the `python -m cache_teacher run` command that made it (same arguments, --out {store})" in err
    assert not (tmp_path / "run" / "student").exists()


@pytest.mark.e2e
def test_resume_refuses_a_store_rebuilt_at_the_same_path(train_artefacts, tmp_path, capsys):
    from cache_teacher.__main__ import main as cache_main

    store = tmp_path / "bound.zarr"
    shutil.copytree(train_artefacts["store"], store)
    run = tmp_path / "run"
    assert main(tiny_train_args(train_artefacts, run, "--max-steps", "2", store=store)) == 0
    shutil.rmtree(store)
    assert cache_main(tiny_cache_args(train_artefacts, store, "--seed", "1", "--limit-images", "4")) == 0
    capsys.readouterr()
    status, err = train_refusal(capsys, tiny_train_args(train_artefacts, run, "--resume", store=store))
    assert status == 2 and "was started with other settings" in err
    assert "store_identity.store_id: recorded '" in err
    assert "store_identity.seed: recorded 0, now 1" in err and "store_identity.num_images: recorded 6, now 4" in err
    assert "store_identity.mask_calibration" in err and len(err) < 3000  # named, not printed in full


def test_a_run_of_the_old_view_records_is_not_resumed(train_artefacts, reference_run, tmp_path, capsys):
    """A run recorded before view records v2 (its run.json names no version) drew its views by the crop rule
    of spec v2: its --resume is refused in one line saying why, and its folder is left as it was."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    record = json.loads((run / "run.json").read_text())
    assert record.pop("view_params_version") == 2
    (run / "run.json").write_text(json.dumps(record))
    before = {path: path.read_bytes() for path in run.iterdir() if path.is_file()}
    capsys.readouterr()
    status, err = train_refusal(capsys, tiny_train_args(train_artefacts, run, "--resume",
                                                        "--max-steps", str(TRAIN_STEPS + 1)))
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"the run in {run} drew its views as view records v1 (crop boxes of spec v2" in err
    assert "start a new run in another folder" in err
    assert {path: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


def test_a_damaged_image_is_refused_at_training_start(train_artefacts, tmp_path, capsys):
    from formats.images import ImageFile

    images = tmp_path / "damaged.beton"
    shutil.copy(train_artefacts["images"], images)
    start, size = ImageFile(images).span(4)
    position = start + size // 2
    data = bytearray(images.read_bytes())
    data[position] ^= 0x20  # one bit in the middle of image 4's JPEG data
    images.write_bytes(bytes(data))
    args = tiny_train_args(train_artefacts, tmp_path / "run")
    args[args.index("--images") + 1] = str(images)
    status, err = train_refusal(capsys, args)
    assert status == 2 and err.count("\n") == 1
    assert f"{images}: 1 of {TRAIN_IMAGES} images are damaged (CRC32C mismatch; first: [4]); re-pack it" in err
    assert not (tmp_path / "run").exists()


def test_an_image_batch_out_of_step_with_its_targets_is_refused(train_artefacts, tmp_path, capsys, monkeypatch):
    """FFCV's order shifted by one image against the target reader's: the decoded image sizes are not those of
    the images the batch's targets belong to, so training stops in one line before its first step."""
    from train_student.data import PlannedOrder

    planned = PlannedOrder.sample_order
    monkeypatch.setattr(PlannedOrder, "sample_order", lambda self, epoch: np.roll(planned(self, epoch), 1))
    status, err = train_refusal(capsys, tiny_train_args(train_artefacts, tmp_path / "run"))
    assert status == 2 and err.count("\n") == 1, err
    assert f"micro-batch 0 of epoch 0: the images FFCV decoded from {train_artefacts['images']} are not" in err
    assert "out of step" in err and not (tmp_path / "run").exists()


def test_user_errors_are_one_line_and_a_failed_start_leaves_no_run_folder(train_artefacts, tmp_path, capsys):
    def refused(argv) -> str:
        status, err = train_refusal(capsys, argv)
        assert status == 2 and "Traceback" not in err and err.startswith("error: "), err
        return err.splitlines()[0]

    truncated = tmp_path / "truncated.zarr"
    shutil.copytree(train_artefacts["store"], truncated)
    (truncated / "local" / "zarr.json").write_text('{"shape": [6, 2')
    assert str(truncated / "local" / "zarr.json") in refused(tiny_train_args(train_artefacts, tmp_path / "a",
                                                                             store=truncated))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert "is a file" in refused(tiny_train_args(train_artefacts, a_file))

    # Damaged chunks (their Blosc headers zeroed; each chunk's CRC32C catches it before decompression) at
    # step 1: the file is named, and the run folder, which holds no checkpoint, is removed (or left as empty
    # as it was, but for its lock file) so that the corrected command is not refused.
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(train_artefacts["store"], damaged)
    shard_file = damaged / "global" / "c" / "0" / "0" / "0"  # one shard: 3 blocks of 2 images x K=2 chunks

    def zero_blosc_header(data, offset, nbytes):
        data[offset:offset + 16] = bytes(16)
    _damage_every_chunk(shard_file, zero_blosc_header)
    for out in (tmp_path / "new-run", tmp_path / "empty-run"):
        if out.name == "empty-run":
            out.mkdir()
        line = refused(tiny_train_args(train_artefacts, out, store=damaged))
        assert str(shard_file) in line and "is damaged (CRC32C mismatch)" in line
        assert out.exists() == (out.name == "empty-run")
        assert not (out.exists() and any(entry.name != ".lock" for entry in out.iterdir()))


def test_swapped_inputs_and_the_opt_in_store_checks(train_artefacts, tmp_path, capsys):
    """--images and --backgrounds swapped: said so. A damaged store: `verify --checksums-only` finds it without the
    teacher, and `--check-store` refuses it before training instead of in the epoch that first reads it."""
    from cache_teacher.__main__ import main as cache_main

    args = tiny_train_args(train_artefacts, tmp_path / "swapped")
    i, b = args.index("--images") + 1, args.index("--backgrounds") + 1
    args[i], args[b] = args[b], args[i]
    status, err = train_refusal(capsys, args)
    assert status == 2 and "--images and --backgrounds are swapped" in err and err.count("\n") == 1, err

    assert cache_main(["verify", str(train_artefacts["store"]), "--checksums-only"]) == 0
    assert "the teacher was not re-run" in capsys.readouterr().out
    store = tmp_path / "damaged.zarr"
    shutil.copytree(train_artefacts["store"], store)
    shard = store / "global" / "c" / "0" / "0" / "0"
    _flip_a_bit_in_every_chunk(shard)
    assert cache_main(["verify", str(store), "--checksums-only"]) == 1
    assert str(shard) in capsys.readouterr().out

    checked = tiny_train_args(train_artefacts, tmp_path / "checked", "--check-store", store=store)
    status, err = train_refusal(capsys, checked)
    assert status == 2 and err.startswith("error: --check-store: ") and str(shard) in err, err
    assert not (tmp_path / "checked").exists()
