"""train_student end to end on real artefacts: a packed .beton, a store written by `cache_teacher run`,
real training subprocesses (one killed with SIGKILL and resumed), torchrun with gloo, refusals, bench.

Everything is tiny (6 images, 2 view sets, global batch 2, a few steps) but runs the real code paths.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from runtime.arguments import usable_cores
from helpers import can_mount_tmpfs, free_port, pack_demo_data, two_node_launcher
from train_student.__main__ import main
from train_student.metrics import LOSS_COLUMNS, read_metrics

# FFCV's JIT-compiled JPEG decoder trips a harmless numba finalizer KeyError when collected in-process.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

NUM_IMAGES = 6
STEPS = 4
TRAIN_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# Columns a resumed / multi-process run must reproduce (samples/s and data wait are timings).
COMPARED = LOSS_COLUMNS + ("lr", "ema_momentum", "moe_weight", "grad_norm")


def _python(*args, **kwargs):
    return subprocess.run([sys.executable, *args], env=TRAIN_ENV, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    from cache_teacher.__main__ import main as cache_main

    # The caching CLI runs in this process (its own tests cover it as a subprocess); only training,
    # which is what is tested here, pays for fresh interpreters.
    paths = pack_demo_data(root, persons=NUM_IMAGES)
    assert cache_main(["run", "--teacher", "path-b", "--weights", paths["weights"], "--images",
                       str(root / "persons.beton"), "--backgrounds", str(root / "backgrounds.beton"), "-K", "2",
                       "--chunk-images", "2", "--calibration-images", "2", "--out", str(root / "store.zarr"),
                       "--no-progress"]) == 0
    return {"root": root, "store": root / "store.zarr", "images": root / "persons.beton",
            "backgrounds": root / "backgrounds.beton", "weights": paths["weights"]}


def _train_args(artefacts, out, *extra, store=None):
    # A real lr from the first step (no warm-up) so that every step moves the weights visibly.
    return ["--recipe", "path-b_vit-ti", "--store", str(store or artefacts["store"]), "--images",
            str(artefacts["images"]), "--backgrounds", str(artefacts["backgrounds"]), "--out", str(out),
            "--batch-size", "2", "--lr", "1e-3", "--warmup-epochs", "0", "--epochs", "3", "--max-steps", str(STEPS),
            "--checkpoint-every", "2", "--workers", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference_run(artefacts):
    out = artefacts["root"] / "reference"
    done = _python("-m", "train_student", *_train_args(artefacts, out, "--keep-checkpoints", "2"))
    assert done.returncode == 0, done.stderr
    return out


def _compared(rows):
    return [[row[key] for key in COMPARED] for row in rows]


@pytest.mark.e2e
def test_run_logs_every_step_and_exports_timm_students(reference_run):
    import timm

    import dpal  # noqa: F401  (registers the students with timm)

    rows = read_metrics(reference_run / "metrics.csv")
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert [row["epoch"] for row in rows] == [0, 0, 0, 1]  # 6 images / batch 2 = 3 steps per epoch
    assert all(np.isfinite(row[key]) for row in rows for key in COMPARED)
    assert rows[0]["lr"] == 1e-3 and rows[1]["lr"] < 1e-3  # no warm-up: the cosine from the first step
    assert all(0 <= row["data_wait_share"] <= 1 and row["samples_per_s"] > 0 for row in rows)
    assert (reference_run / "loss.png").stat().st_size > 10_000
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))

    state = torch.load(reference_run / "checkpoint.pt", weights_only=True)
    assert state["step"] == STEPS
    # --keep-checkpoints 2 (saved at steps 2 and 4): the newest is checkpoint.pt itself, linked
    kept = sorted(path.name for path in reference_run.glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00000002.pt", f"checkpoint-{STEPS:08d}.pt"]
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
def test_int8_store_trains_like_the_float16_store(artefacts, reference_run):
    """Same teacher, views and data order; only the target format differs. The first step's losses
    agree up to int8 rounding (local: half a step per value; relation: log-domain codes)."""
    from cache_teacher.__main__ import main as cache_main

    store = artefacts["root"] / "int8.zarr"
    assert cache_main(["run", "--teacher", "path-b", "--weights", artefacts["weights"], "--images",
                       str(artefacts["images"]), "--backgrounds", str(artefacts["backgrounds"]), "-K", "2",
                       "--chunk-images", "2", "--calibration-images", "2", "--format", "int8", "--out", str(store),
                       "--no-progress"]) == 0
    out = artefacts["root"] / "int8_run"
    done = _python("-m", "train_student", *_train_args(artefacts, out, "--max-steps", "1", store=store))
    assert done.returncode == 0, done.stderr
    (int8_row,), float16_row = read_metrics(out / "metrics.csv"), read_metrics(reference_run / "metrics.csv")[0]
    assert int8_row["global"] == float16_row["global"] and int8_row["moe"] == float16_row["moe"]
    assert int8_row["local"] == pytest.approx(float16_row["local"], rel=1e-2)
    assert int8_row["relation"] == pytest.approx(float16_row["relation"], rel=1e-2)
    assert int8_row["relation"] != float16_row["relation"]  # the int8 targets were really read


@pytest.mark.e2e
def test_a_lossless_compact_store_trains_like_the_float16_store(artefacts, reference_run):
    """The compact format at its lossless knobs, decoded where the step's targets are staged, gives the float16
    store's first-step losses: the step itself does not change with the format."""
    from cache_teacher.__main__ import main as cache_main

    store = artefacts["root"] / "compact.zarr"
    assert cache_main(["run", "--teacher", "path-b", "--weights", artefacts["weights"], "--images",
                       str(artefacts["images"]), "--backgrounds", str(artefacts["backgrounds"]), "-K", "2",
                       "--chunk-images", "2", "--calibration-images", "2", "--format", "compact", "--token-rank", "768",
                       "--token-bits", "16", "--relation-k", "257", "--relation-bits", "16", "--out", str(store),
                       "--no-progress"]) == 0
    out = artefacts["root"] / "compact_run"
    done = _python("-m", "train_student", *_train_args(artefacts, out, "--max-steps", "1", store=store))
    assert done.returncode == 0, done.stderr
    (compact_row,), float16_row = read_metrics(out / "metrics.csv"), read_metrics(reference_run / "metrics.csv")[0]
    for term in ("global", "local", "relation", "moe"):
        assert compact_row[term] == pytest.approx(float16_row[term], rel=1e-4), term


def _rows(out):
    path = out / "metrics.csv"
    return len(read_metrics(path)) if path.exists() else -1


def _poll_until(process, ready, timeout: float) -> None:
    """Wait until ready() holds, the process ends, or the timeout passes."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.02)


def _training_at_step(artefacts, out, steps: int, *extra) -> subprocess.Popen:
    """A real training subprocess, returned once it has logged `steps` steps (or ended)."""
    process = subprocess.Popen([sys.executable, "-m", "train_student", *_train_args(artefacts, out, *extra)],
                               env=TRAIN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _poll_until(process, lambda: _rows(out) >= steps, timeout=600)  # a loaded machine starts slowly
    return process


@pytest.mark.e2e
def test_killed_run_resumes_to_the_same_losses(artefacts, reference_run):
    out = artefacts["root"] / "killed"
    # step 2 is checkpointed and exported; step 3 is done but not saved
    process = _training_at_step(artefacts, out, 3, "--export-every", "2", "--no-export-program")
    assert process.poll() is None, "training ended before it could be killed: " + process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert json.loads((out / "student_ema" / "config.json").read_text())["dpal"]["extra"]["step"] == 2

    # The killed run's checkpoint exported by the command, as the run would have at its end.
    for folder in ("student", "student_ema"):
        shutil.rmtree(out / folder)
    assert main(["export", str(out), "--no-program"]) == 0
    from dpal.students import load_student
    for name in ("student", "student_ema"):
        assert json.loads((out / name / "config.json").read_text())["dpal"]["extra"]["step"] == 2
        exported = load_student(out / name).state_dict()
        assert all(torch.equal(value, state[name][f"backbone.{key}"]) for key, value in exported.items())

    refused = _python("-m", "train_student", *_train_args(artefacts, out))
    assert refused.returncode == 2 and "already holds another run" in refused.stderr

    # The run's own run.json as --config reproduces its options exactly (a resume refuses any difference).
    resumed = _python("-m", "train_student", "--config", str(out / "run.json"), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _compared(read_metrics(out / "metrics.csv")) == _compared(read_metrics(reference_run / "metrics.csv"))


@pytest.mark.e2e
def test_two_gloo_ranks_match_one_process_at_the_same_global_batch(artefacts, reference_run):
    out = artefacts["root"] / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "train_student",
                           *_train_args(artefacts, out, "--device", "cpu")],
                          env=TRAIN_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    ddp, single = _compared(read_metrics(out / "metrics.csv")), _compared(read_metrics(reference_run / "metrics.csv"))
    # Stated tolerance: 1e-4 relative. The two runs see the same images and views per global batch and
    # differ only in float summation order (two half-batch means averaged by all-reduce vs one mean).
    np.testing.assert_allclose(np.array(ddp), np.array(single), rtol=1e-4, atol=1e-7)


def _refusal(capsys, argv):
    status = main(argv)
    return status, capsys.readouterr().err


def test_refusals_name_the_problem(artefacts, tmp_path, capsys):
    args = _train_args(artefacts, tmp_path / "a")
    args[args.index("--recipe") + 1] = "path-l_vit-ti"
    status, err = _refusal(capsys, args)
    assert status == 2 and "path-l" in err and "teacher" in err
    assert not (tmp_path / "a").exists()  # nothing written for a refused run

    args = _train_args(artefacts, tmp_path / "b")
    args[args.index("--backgrounds") + 1] = str(artefacts["images"])
    status, err = _refusal(capsys, args)
    assert status == 2 and "background pool" in err

    status, err = _refusal(capsys, _train_args(artefacts, tmp_path / "c", store=tmp_path / "missing.zarr"))
    assert status == 2 and "missing.zarr" in err and "does not exist" in err

    unfinished = tmp_path / "unfinished.zarr"
    shutil.copytree(artefacts["store"], unfinished)
    for marker in (unfinished / "dpal_progress").glob("shard_*.json"):
        marker.unlink()
    status, err = _refusal(capsys, _train_args(artefacts, tmp_path / "d", store=unfinished))
    assert status == 2 and "incomplete" in err

    spec_v1 = tmp_path / "spec_v1.zarr"  # targets of the old teacher position-embedding resize
    shutil.copytree(artefacts["store"], spec_v1)
    meta = json.loads((spec_v1 / "zarr.json").read_text())
    meta["attributes"]["dpal_store"]["spec_version"] = 1
    (spec_v1 / "zarr.json").write_text(json.dumps(meta))
    status, err = _refusal(capsys, _train_args(artefacts, tmp_path / "d1", store=spec_v1))
    assert status == 2 and len(err.strip().splitlines()) == 1 and "spec_v1.zarr was written under spec v1" in err
    assert "Rebuild it with `python -m cache_teacher run`" in err and not (tmp_path / "d1").exists()

    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(artefacts["images"].read_bytes()[:5000])
    args = _train_args(artefacts, tmp_path / "e")
    args[args.index("--images") + 1] = str(truncated)
    status, err = _refusal(capsys, args)
    assert status == 2 and "truncated.beton" in err

    status, err = _refusal(capsys, _train_args(artefacts, tmp_path / "f", "--accum-steps", "4"))
    assert status == 2 and "not divisible" in err

    with pytest.raises(SystemExit):
        main(["--recipe", "nope"])
    assert "path-b_vit-ti" in capsys.readouterr().err


@pytest.mark.parametrize("poisoned_step", [3, 2])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(artefacts, tmp_path, capsys, poisoned_step):
    """The host reads a step's values one step late. Step 3 poisoned: found at step 4, the checkpoint of step
    2 is kept. Step 2 poisoned, a checkpoint step: its values are settled before saving, so no checkpoint is
    written after the bad step (and none before it: nothing of the run is kept)."""
    from train_student.data import FeedPlan

    store = tmp_path / "poisoned.zarr"
    shutil.copytree(artefacts["store"], store)
    plan = FeedPlan(num_images=NUM_IMAGES, chunk_images=2, micro_batch=2, world_size=1, rank=0, accum_steps=1,
                    seed=0, window_images=1024)
    poisoned = plan.rank_order(0)[2 * (poisoned_step - 1):2 * poisoned_step]
    targets = zarr.open_array(store / "global", mode="r+")
    for image in poisoned:
        targets[int(image)] = np.full(targets.shape[1:], np.nan, dtype=targets.dtype)

    out = tmp_path / "nan"
    status, err = _refusal(capsys, _train_args(artefacts, out, store=store))
    assert status == 2 and f"not finite at step {poisoned_step}" in err
    if poisoned_step == 3:
        assert "step 2) is kept" in err
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
        assert not (out / "student").exists()
    else:
        assert "no checkpoint had been written yet" in err and not (out / "checkpoint.pt").exists()


def test_bench_compares_cached_and_online_steps_and_the_feed(artefacts, tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", "--recipe", "path-b_vit-ti", "--store", str(artefacts["store"]), "--images",
                 str(artefacts["images"]), "--backgrounds", str(artefacts["backgrounds"]), "--teacher-weights",
                 artefacts["weights"], "--batch-size", "2", "--steps", "1", "--warmup-steps", "0",
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
    assert main(["bench", "--recipe", "path-b_vit-ti", "--store", str(missing), "--images", str(artefacts["images"]),
                 "--backgrounds", str(artefacts["backgrounds"]), "--feed-only"]) == 2
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


def test_a_damaged_store_chunk_stops_training_naming_the_file(artefacts, tmp_path, capsys):
    store = tmp_path / "damaged.zarr"
    shutil.copytree(artefacts["store"], store)
    shard = store / "global" / "c" / "0" / "0" / "0"
    _flip_a_bit_in_every_chunk(shard)
    status, err = _refusal(capsys, _train_args(artefacts, tmp_path / "run", store=store))
    assert status == 2 and err.count("\n") == 1
    assert f"{shard}: chunk" in err and "is damaged (CRC32C mismatch)" in err
    assert f"re-running the `python -m cache_teacher run` command that made it (same arguments, --out {store})" in err
    assert not (tmp_path / "run" / "student").exists()


@pytest.mark.e2e
def test_resume_refuses_a_store_rebuilt_at_the_same_path(artefacts, tmp_path, capsys):
    from cache_teacher.__main__ import main as cache_main

    store = tmp_path / "bound.zarr"
    shutil.copytree(artefacts["store"], store)
    run = tmp_path / "run"
    assert main(_train_args(artefacts, run, "--max-steps", "2", store=store)) == 0
    shutil.rmtree(store)
    assert cache_main(["run", "--teacher", "path-b", "--weights", artefacts["weights"], "--images",
                       str(artefacts["images"]), "--backgrounds", str(artefacts["backgrounds"]), "-K", "2",
                       "--chunk-images", "2", "--calibration-images", "2", "--seed", "1", "--limit-images", "4",
                       "--out", str(store), "--no-progress"]) == 0
    capsys.readouterr()
    status, err = _refusal(capsys, _train_args(artefacts, run, "--resume", store=store))
    assert status == 2 and "was started with other settings" in err
    assert "store_identity.store_id: recorded '" in err
    assert "store_identity.seed: recorded 0, now 1" in err and "store_identity.num_images: recorded 6, now 4" in err
    assert "store_identity.mask_calibration" in err and len(err) < 3000  # named, not printed in full


def test_a_run_of_the_old_view_records_is_not_resumed(artefacts, reference_run, tmp_path, capsys):
    """A run recorded before view records v2 (its run.json names no version) drew its views by the crop rule
    of spec v2: its --resume is refused in one line saying why, and its folder is left as it was."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    record = json.loads((run / "run.json").read_text())
    assert record.pop("view_params_version") == 2
    (run / "run.json").write_text(json.dumps(record))
    before = {path: path.read_bytes() for path in run.iterdir() if path.is_file()}
    capsys.readouterr()
    status, err = _refusal(capsys, _train_args(artefacts, run, "--resume", "--max-steps", str(STEPS + 1)))
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"the run in {run} drew its views as view records v1 (crop boxes of spec v2" in err
    assert "start a new run in another folder" in err
    assert {path: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


@pytest.mark.e2e
@pytest.mark.skipif(usable_cores() < 2, reason="resumes with --workers 2")
def test_a_resume_with_other_decoding_workers_is_bit_identical_and_other_arithmetic_is_refused(
        artefacts, reference_run, capsys):
    """--workers sets FFCV's decoding threads only: a run stopped after 2 steps and resumed with --workers 2
    gives the uninterrupted --workers 1 run's losses exactly (it used to set torch's threads too). A resume
    that changes the arithmetic, or finds another run's checkpoint, is refused in one line and changes nothing."""
    out = artefacts["root"] / "workers"
    first = _python("-m", "train_student", *_train_args(artefacts, out, "--max-steps", "2"))
    assert first.returncode == 0, first.stderr
    recorded, checkpoint = (out / "run.json").read_text(), (out / "checkpoint.pt").read_bytes()
    for extra, named in ((("--compile",), "compile: recorded False, now True"),
                         (("--deterministic",), "deterministic: recorded False, now True")):
        status, err = _refusal(capsys, _train_args(artefacts, out, "--resume", *extra))
        assert status == 2 and err.count("\n") == 1 and named in err and "pass --inexact-resume" in err, err
    shutil.copy(reference_run / "checkpoint.pt", out / "checkpoint.pt")  # same settings, another run
    status, err = _refusal(capsys, _train_args(artefacts, out, "--resume"))
    assert status == 2 and "belongs to another run" in err and "it was copied or moved here" in err, err
    (out / "checkpoint.pt").write_bytes(checkpoint)
    assert (out / "run.json").read_text() == recorded and not (out / ".lock").exists()
    resumed = _python("-m", "train_student", *_train_args(artefacts, out, "--resume", "--workers", "2",
                                                          "--checkpoint-every", "1"))
    assert resumed.returncode == 0, resumed.stderr
    assert _compared(read_metrics(out / "metrics.csv")) == _compared(read_metrics(reference_run / "metrics.csv"))
    assert json.loads((out / "run.json").read_text())["workers"] == 2 and not (out / ".lock").exists()


@pytest.mark.e2e
def test_a_second_process_on_a_run_folder_is_refused(artefacts, reference_run):
    """Two real trainings on one --out: the second (--resume or not) is refused in one line while the first
    runs (they used to both exit 0 and interleave metrics.csv); the first, stopped meanwhile, is undisturbed."""
    out = artefacts["root"] / "contended"
    first = _training_at_step(artefacts, out, 1)
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, "training ended before the second started: " + first.stderr.read().decode()
        seconds = [subprocess.Popen([sys.executable, "-m", "train_student", *_train_args(artefacts, out, *extra)],
                                    env=TRAIN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for extra in (("--resume",), ())]  # both at once
        errors = [second.communicate(timeout=300)[1] for second in seconds]
    finally:
        first.send_signal(signal.SIGCONT)
    for second, err in zip(seconds, errors):
        assert second.returncode == 2 and err.count("\n") == 1, err[-3000:]
        assert f"error: run folder {out} is being written by pid {first.pid} on " in err
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-3000:]
    assert _compared(read_metrics(out / "metrics.csv")) == _compared(read_metrics(reference_run / "metrics.csv"))


def test_a_damaged_image_is_refused_at_training_start(artefacts, tmp_path, capsys):
    from formats.images import ImageFile

    images = tmp_path / "damaged.beton"
    shutil.copy(artefacts["images"], images)
    start, size = ImageFile(images).span(4)
    position = start + size // 2
    data = bytearray(images.read_bytes())
    data[position] ^= 0x20  # one bit in the middle of image 4's JPEG data
    images.write_bytes(bytes(data))
    args = _train_args(artefacts, tmp_path / "run")
    args[args.index("--images") + 1] = str(images)
    status, err = _refusal(capsys, args)
    assert status == 2 and err.count("\n") == 1
    assert f"{images}: 1 of {NUM_IMAGES} images are damaged (CRC32C mismatch; first: [4]); re-pack it" in err
    assert not (tmp_path / "run").exists()


def test_an_image_batch_out_of_step_with_its_targets_is_refused(artefacts, tmp_path, capsys, monkeypatch):
    """FFCV's order shifted by one image against the target reader's: the decoded image sizes are not those of
    the images the batch's targets belong to, so training stops in one line before its first step."""
    from train_student.data import PlannedOrder

    planned = PlannedOrder.sample_order
    monkeypatch.setattr(PlannedOrder, "sample_order", lambda self, epoch: np.roll(planned(self, epoch), 1))
    status, err = _refusal(capsys, _train_args(artefacts, tmp_path / "run"))
    assert status == 2 and err.count("\n") == 1, err
    assert f"micro-batch 0 of epoch 0: the images FFCV decoded from {artefacts['images']} are not" in err
    assert "out of step" in err and not (tmp_path / "run").exists()


def _wait_for(process, ready, what: str, timeout: float = 300):
    _poll_until(process, ready, timeout)
    assert process.poll() is None, f"training ended before {what}: " + process.stderr.read()


@pytest.mark.e2e
def test_signals_checkpoint_at_the_step_boundary_and_resume_to_the_same_losses(artefacts, reference_run):
    """SIGINT during step 1 of a fresh run, SIGTERM during step 3 of its resume: each stops after that step
    with a checkpoint and one line; the second resume finishes with the uninterrupted run's losses."""
    out = artefacts["root"] / "signalled"
    for signum, resume, ready, stop_step in ((signal.SIGINT, [], lambda: _rows(out) >= 0, 1),
                                             (signal.SIGTERM, ["--resume"], lambda: _rows(out) >= 2, 3)):
        process = subprocess.Popen([sys.executable, "-m", "train_student", *_train_args(artefacts, out, *resume)],
                                   env=TRAIN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_for(process, ready, f"the {signal.Signals(signum).name}")
        process.send_signal(signum)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 128 + signum and "Traceback" not in err, err
        assert err.splitlines()[-1] == (f"interrupted: stopped by {signal.Signals(signum).name} after step {stop_step}; "
                                        f"checkpoint {out / 'checkpoint.pt'} written: continue with the same command "
                                        f"and --resume"), err
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == stop_step == _rows(out)
    stale = out / ".checkpoint.pt.tmp-424242"  # what a kill during a save leaves
    stale.write_bytes(b"partial checkpoint")
    resumed = _python("-m", "train_student", *_train_args(artefacts, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert not stale.exists()
    assert _compared(read_metrics(out / "metrics.csv")) == _compared(read_metrics(reference_run / "metrics.csv"))


def test_user_errors_are_one_line_and_a_failed_start_leaves_no_run_folder(artefacts, tmp_path, capsys):
    def refused(argv) -> str:
        status, err = _refusal(capsys, argv)
        assert status == 2 and "Traceback" not in err and err.startswith("error: "), err
        return err.splitlines()[0]

    truncated = tmp_path / "truncated.zarr"
    shutil.copytree(artefacts["store"], truncated)
    (truncated / "local" / "zarr.json").write_text('{"shape": [6, 2')
    assert str(truncated / "local" / "zarr.json") in refused(_train_args(artefacts, tmp_path / "a", store=truncated))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert "is a file" in refused(_train_args(artefacts, a_file))

    # Damaged chunks (their Blosc headers zeroed; each chunk's CRC32C catches it before decompression) at
    # step 1: the file is named, and the run folder, which holds no checkpoint, is removed (or left as empty
    # as it was, but for its lock file) so that the corrected command is not refused.
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(artefacts["store"], damaged)
    shard_file = damaged / "global" / "c" / "0" / "0" / "0"  # one shard: 3 blocks of 2 images x K=2 chunks

    def zero_blosc_header(data, offset, nbytes):
        data[offset:offset + 16] = bytes(16)
    _damage_every_chunk(shard_file, zero_blosc_header)
    for out in (tmp_path / "new-run", tmp_path / "empty-run"):
        if out.name == "empty-run":
            out.mkdir()
        line = refused(_train_args(artefacts, out, store=damaged))
        assert str(shard_file) in line and "is damaged (CRC32C mismatch)" in line
        assert out.exists() == (out.name == "empty-run")
        assert not (out.exists() and any(entry.name != ".lock" for entry in out.iterdir()))


@pytest.mark.e2e
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs (a real full disk)")
def test_full_disk_is_one_line_naming_the_file(artefacts, tmp_path):
    """A real full disk (tiny tmpfs in a private mount namespace) while creating a store and while saving a
    checkpoint: one line naming the file; no staging folder and no run folder without a checkpoint left."""
    tiny_store_disk, tiny_run_disk = tmp_path / "store-disk", tmp_path / "run-disk"
    tiny_store_disk.mkdir()
    tiny_run_disk.mkdir()
    store, run = tiny_store_disk / "s.zarr", tiny_run_disk / "run"
    cache = [sys.executable, "-m", "cache_teacher", "run", "--teacher", "path-b", "--weights", artefacts["weights"],
             "--images", str(artefacts["images"]), "--backgrounds", str(artefacts["backgrounds"]), "-K", "2",
             "--chunk-images", "2", "--calibration-images", "2", "--out", str(store), "--skip-space-check",
             "--no-progress"]
    train = [sys.executable, "-m", "train_student",
             *_train_args(artefacts, run, "--checkpoint-every", "1", "--max-steps", "2")]
    script = (f'mount -t tmpfs -o size=8k tmpfs {tiny_store_disk} && mount -t tmpfs -o size=1m tmpfs {tiny_run_disk} '
              f'&& {{ {" ".join(map(shlex.quote, cache))}; echo "cache status $?"; '
              f'ls -A {tiny_store_disk}; {" ".join(map(shlex.quote, train))}; echo "train status $?"; '
              f'ls -A {tiny_run_disk}; }}')
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=TRAIN_ENV, capture_output=True, text=True,
                            timeout=900)
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert "cache status 2" in result.stdout and "train status 2" in result.stdout, result.stdout + result.stderr
    assert f"error: cannot create store {store}: No space left on device" in result.stderr, result.stderr
    assert any(line.startswith(f"error: cannot write checkpoint {run / 'checkpoint.pt'} (") and
               f"No space left on device, on the disk mounted at {tiny_run_disk}, " in line and
               line.endswith("no checkpoint had been written yet, so the run folder is removed: free space and "
                             "run the same command again, without --resume") for line in lines), result.stderr
    listed = result.stdout.split("cache status 2", 1)[1]
    assert "creating" not in listed and "run" not in listed.split("train status 2")[1], result.stdout


@pytest.mark.e2e
def test_two_nodes_stop_together_on_one_nodes_sigterm_and_match_one_process(artefacts, reference_run):
    """Scale check: two torchrun launchers as two nodes (c10d rendezvous on 127.0.0.1). The second node is
    preempted (SIGTERM to its launcher) during training: both ranks stop after the same step, rank 0 writes
    the checkpoint; the two-node resume then gives the one-process losses at the same global batch."""
    out = artefacts["root"] / "two-nodes"
    for attempt, resume in enumerate(([], ["--resume"])):
        command = two_node_launcher(free_port(), f"two-nodes-{attempt}") + [
            "-m", "train_student", *_train_args(artefacts, out, "--device", "cpu", *resume)]
        first = subprocess.Popen(command, env=TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)  # the first launcher hosts the rendezvous store; the second node is the one preempted
        second = subprocess.Popen(command, env=TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not resume:
            _wait_for(second, lambda: _rows(out) >= 1, "the SIGTERM", timeout=600)
            second.send_signal(signal.SIGTERM)
        errs = [node.communicate(timeout=900)[1] for node in (first, second)]
        if resume:
            assert first.returncode == second.returncode == 0, errs[0][-3000:] + errs[1][-3000:]
            continue
        stopped = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
        assert 1 < stopped < STEPS and _rows(out) == stopped
        for err in errs:  # each rank says where it stopped, both at the same step (torchrun itself then
            # reports the worker's status 143 as a failure, with its own launcher traceback)
            assert f"interrupted: stopped by SIGTERM after step {stopped}; checkpoint" in err, err[-3000:]
            assert "train_student/" not in err, err[-3000:]
    two_nodes, single = _compared(read_metrics(out / "metrics.csv")), _compared(read_metrics(reference_run / "metrics.csv"))
    np.testing.assert_allclose(np.array(two_nodes), np.array(single), rtol=1e-4, atol=1e-7)  # as the 2-rank test


def test_swapped_inputs_and_the_opt_in_store_checks(artefacts, tmp_path, capsys):
    """--images and --backgrounds swapped: said so. A damaged store: `verify --checksums-only` finds it without the
    teacher, and `--check-store` refuses it before training instead of in the epoch that first reads it."""
    from cache_teacher.__main__ import main as cache_main

    args = _train_args(artefacts, tmp_path / "swapped")
    i, b = args.index("--images") + 1, args.index("--backgrounds") + 1
    args[i], args[b] = args[b], args[i]
    status, err = _refusal(capsys, args)
    assert status == 2 and "--images and --backgrounds are swapped" in err and err.count("\n") == 1, err

    assert cache_main(["verify", str(artefacts["store"]), "--checksums-only"]) == 0
    assert "the teacher was not re-run" in capsys.readouterr().out
    store = tmp_path / "damaged.zarr"
    shutil.copytree(artefacts["store"], store)
    shard = store / "global" / "c" / "0" / "0" / "0"
    _flip_a_bit_in_every_chunk(shard)
    assert cache_main(["verify", str(store), "--checksums-only"]) == 1
    assert str(shard) in capsys.readouterr().out

    status, err = _refusal(capsys, _train_args(artefacts, tmp_path / "checked", "--check-store", store=store))
    assert status == 2 and err.startswith("error: --check-store: ") and str(shard) in err, err
    assert not (tmp_path / "checked").exists()
