"""train_student as real processes on real artefacts: a run killed with SIGKILL, stopped by SIGINT and SIGTERM,
resumed with other decoding threads, contended by a second process, on a full disk, and torchrun with two gloo
ranks and with two nodes, each compared with the one-process run (`reference_run`, tests/conftest.py).
"""
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import (TRAIN_ENV, TRAIN_STEPS, can_mount_tmpfs, compared_columns, free_port, run_python,
                     tiny_cache_args, tiny_train_args, train_refusal, two_node_launcher)
from runtime.arguments import usable_cores
from train_student.__main__ import main
from train_student.metrics import read_metrics

# FFCV's JIT-compiled JPEG decoder trips a harmless numba finalizer KeyError when collected in-process.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _rows(out):
    path = out / "metrics.csv"
    return len(read_metrics(path)) if path.exists() else -1


def _poll_until(process, ready, timeout: float) -> None:
    """Wait until ready() holds, the process ends, or the timeout passes."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.02)


def _training_at_step(train_artefacts, out, steps: int, *extra) -> subprocess.Popen:
    """A real training subprocess, returned once it has logged `steps` steps (or ended)."""
    process = subprocess.Popen([sys.executable, "-m", "train_student", *tiny_train_args(train_artefacts, out, *extra)],
                               env=TRAIN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _poll_until(process, lambda: _rows(out) >= steps, timeout=600)  # a loaded machine starts slowly
    return process


@pytest.mark.e2e
def test_killed_run_resumes_to_the_same_losses(train_artefacts, reference_run, tmp_path):
    out = tmp_path / "killed"
    # step 2 is checkpointed and exported; step 3 is done but not saved
    process = _training_at_step(train_artefacts, out, 3, "--export-every", "2", "--no-export-program")
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

    refused = run_python("-m", "train_student", *tiny_train_args(train_artefacts, out))
    assert refused.returncode == 2 and "already holds another run" in refused.stderr

    # The run's own run.json as --config reproduces its options exactly (a resume refuses any difference).
    resumed = run_python("-m", "train_student", "--config", str(out / "run.json"), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert compared_columns(out / "metrics.csv") == compared_columns(reference_run / "metrics.csv")


@pytest.mark.e2e
def test_two_gloo_ranks_match_one_process_at_the_same_global_batch(train_artefacts, reference_run, tmp_path):
    out = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "train_student",
                           *tiny_train_args(train_artefacts, out, "--device", "cpu")],
                          env=TRAIN_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    ddp, single = compared_columns(out / "metrics.csv"), compared_columns(reference_run / "metrics.csv")
    # Stated tolerance: 1e-4 relative. The two runs see the same images and views per global batch and
    # differ only in float summation order (two half-batch means averaged by all-reduce vs one mean).
    np.testing.assert_allclose(np.array(ddp), np.array(single), rtol=1e-4, atol=1e-7)


@pytest.mark.e2e
@pytest.mark.skipif(usable_cores() < 2, reason="resumes with --workers 2")
def test_a_resume_with_other_decoding_workers_is_bit_identical_and_other_arithmetic_is_refused(
        train_artefacts, reference_run, capsys, tmp_path):
    """--workers sets FFCV's decoding threads only: a run stopped after 2 steps and resumed with --workers 2
    gives the uninterrupted --workers 1 run's losses exactly (it used to set torch's threads too). A resume
    that changes the arithmetic, or finds another run's checkpoint, is refused in one line and changes nothing."""
    out = tmp_path / "workers"
    first = run_python("-m", "train_student", *tiny_train_args(train_artefacts, out, "--max-steps", "2"))
    assert first.returncode == 0, first.stderr
    recorded, checkpoint = (out / "run.json").read_text(), (out / "checkpoint.pt").read_bytes()
    for extra, named in ((("--compile",), "compile: recorded False, now True"),
                         (("--deterministic",), "deterministic: recorded False, now True")):
        status, err = train_refusal(capsys, tiny_train_args(train_artefacts, out, "--resume", *extra))
        assert status == 2 and err.count("\n") == 1 and named in err and "pass --inexact-resume" in err, err
    shutil.copy(reference_run / "checkpoint.pt", out / "checkpoint.pt")  # same settings, another run
    status, err = train_refusal(capsys, tiny_train_args(train_artefacts, out, "--resume"))
    assert status == 2 and "belongs to another run" in err and "it was copied or moved here" in err, err
    (out / "checkpoint.pt").write_bytes(checkpoint)
    assert (out / "run.json").read_text() == recorded and not (out / ".lock").exists()
    resumed = run_python("-m", "train_student", *tiny_train_args(train_artefacts, out, "--resume", "--workers", "2",
                                                          "--checkpoint-every", "1"))
    assert resumed.returncode == 0, resumed.stderr
    assert compared_columns(out / "metrics.csv") == compared_columns(reference_run / "metrics.csv")
    assert json.loads((out / "run.json").read_text())["workers"] == 2 and not (out / ".lock").exists()


@pytest.mark.e2e
def test_a_second_process_on_a_run_folder_is_refused(train_artefacts, reference_run, tmp_path):
    """Two real trainings on one --out: the second (--resume or not) is refused in one line while the first
    runs (they used to both exit 0 and interleave metrics.csv); the first, stopped meanwhile, is undisturbed."""
    out = tmp_path / "contended"
    first = _training_at_step(train_artefacts, out, 1)
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, "training ended before the second started: " + first.stderr.read().decode()
        seconds = [subprocess.Popen([sys.executable, "-m", "train_student",
                                     *tiny_train_args(train_artefacts, out, *extra)],
                                    env=TRAIN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for extra in (("--resume",), ())]  # both at once
        errors = [second.communicate(timeout=300)[1] for second in seconds]
    finally:
        first.send_signal(signal.SIGCONT)
    for second, err in zip(seconds, errors):
        assert second.returncode == 2 and err.count("\n") == 1, err[-3000:]
        assert f"error: run folder {out} is being written by pid {first.pid} on " in err
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-3000:]
    assert compared_columns(out / "metrics.csv") == compared_columns(reference_run / "metrics.csv")


def _wait_for(process, ready, what: str, timeout: float = 300):
    _poll_until(process, ready, timeout)
    assert process.poll() is None, f"training ended before {what}: " + process.stderr.read()


@pytest.mark.e2e
def test_signals_checkpoint_at_the_step_boundary_and_resume_to_the_same_losses(train_artefacts, reference_run,
                                                                               tmp_path):
    """SIGINT during step 1 of a fresh run, SIGTERM during step 3 of its resume: each stops after that step
    with a checkpoint and one line; the second resume finishes with the uninterrupted run's losses."""
    out = tmp_path / "signalled"
    for signum, resume, ready, stop_step in ((signal.SIGINT, [], lambda: _rows(out) >= 0, 1),
                                             (signal.SIGTERM, ["--resume"], lambda: _rows(out) >= 2, 3)):
        process = subprocess.Popen([sys.executable, "-m", "train_student",
                                    *tiny_train_args(train_artefacts, out, *resume)],
                                   env=TRAIN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_for(process, ready, f"the {signal.Signals(signum).name}")
        process.send_signal(signum)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 128 + signum and "Traceback" not in err, err
        assert err.splitlines()[-1] == (f"interrupted: stopped by {signal.Signals(signum).name} after step "
                                        f"{stop_step}; "
                                        f"checkpoint {out / 'checkpoint.pt'} written: continue with the same command "
                                        f"and --resume"), err
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == stop_step == _rows(out)
    stale = out / ".checkpoint.pt.tmp-424242"  # what a kill during a save leaves
    stale.write_bytes(b"partial checkpoint")
    resumed = run_python("-m", "train_student", *tiny_train_args(train_artefacts, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert not stale.exists()
    assert compared_columns(out / "metrics.csv") == compared_columns(reference_run / "metrics.csv")


@pytest.mark.e2e
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs (a real full disk)")
def test_full_disk_is_one_line_naming_the_file(train_artefacts, tmp_path):
    """A real full disk (tiny tmpfs in a private mount namespace) while creating a store and while saving a
    checkpoint: one line naming the file; no staging folder and no run folder without a checkpoint left."""
    tiny_store_disk, tiny_run_disk = tmp_path / "store-disk", tmp_path / "run-disk"
    tiny_store_disk.mkdir()
    tiny_run_disk.mkdir()
    store, run = tiny_store_disk / "s.zarr", tiny_run_disk / "run"
    cache = [sys.executable, "-m", "cache_teacher", *tiny_cache_args(train_artefacts, store, "--skip-space-check")]
    train = [sys.executable, "-m", "train_student",
             *tiny_train_args(train_artefacts, run, "--checkpoint-every", "1", "--max-steps", "2")]
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
def test_two_nodes_stop_together_on_one_nodes_sigterm_and_match_one_process(train_artefacts, reference_run, tmp_path):
    """Scale check: two torchrun launchers as two nodes (c10d rendezvous on 127.0.0.1). The second node is
    preempted (SIGTERM to its launcher) during training: both ranks stop after the same step, rank 0 writes
    the checkpoint; the two-node resume then gives the one-process losses at the same global batch."""
    out = tmp_path / "two-nodes"
    for attempt, resume in enumerate(([], ["--resume"])):
        command = two_node_launcher(free_port(), f"two-nodes-{attempt}") + [
            "-m", "train_student", *tiny_train_args(train_artefacts, out, "--device", "cpu", *resume)]
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
        assert 1 < stopped < TRAIN_STEPS and _rows(out) == stopped
        for err in errs:  # each rank says where it stopped, both at the same step (torchrun itself then
            # reports the worker's status 143 as a failure, with its own launcher traceback)
            assert f"interrupted: stopped by SIGTERM after step {stopped}; checkpoint" in err, err[-3000:]
            assert "train_student/" not in err, err[-3000:]
    two_nodes, single = compared_columns(out / "metrics.csv"), compared_columns(reference_run / "metrics.csv")
    np.testing.assert_allclose(np.array(two_nodes), np.array(single), rtol=1e-4, atol=1e-7)  # as the 2-rank test
