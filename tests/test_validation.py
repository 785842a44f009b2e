"""Validation on fresh views, on real artefacts: a training store and a store of fresh views both written by
`cache_teacher run`, real training subprocesses (one killed with SIGKILL and resumed), `train_student evaluate`
on the run's checkpoint and exports, and the refusals of stores that do not fit.
"""
import csv
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import TRAIN_ENV, compared_columns, run_python, tiny_cache_args, tiny_train_args
from train_student.metrics import LOSS_COLUMNS, VALIDATION_CSV, read_metrics

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def artefacts(train_artefacts, tmp_path_factory):
    """The training tests' inputs and store (`train_artefacts`), and a store of fresh views: the first 3 training
    images cached with another seed."""
    from cache_teacher.__main__ import main as cache_main

    fresh = tmp_path_factory.mktemp("validation") / "fresh.zarr"
    assert cache_main(tiny_cache_args(train_artefacts, fresh, "--seed", "7", "--limit-images", "3",
                                      views_per_image=1)) == 0
    return {**train_artefacts, "fresh": fresh}


def _validated(artefacts, out, *extra):
    return ["-m", "train_student", *tiny_train_args(artefacts, out, "--val-store", str(artefacts["fresh"]),
                                                    "--val-every", "2", *extra)]


@pytest.fixture(scope="module")
def validated_run(artefacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("validated") / "run"
    done = run_python(*_validated(artefacts, out))
    assert done.returncode == 0, done.stderr
    assert "K = 2 view sets per image over 3 epochs: each view set is used 1 or 2 times" in done.stdout
    return out


@pytest.mark.e2e
def test_validation_is_logged_and_does_not_change_training(reference_run, validated_run):
    assert compared_columns(validated_run / "metrics.csv") == compared_columns(reference_run / "metrics.csv")
    rows = read_metrics(validated_run / VALIDATION_CSV)
    assert [row["step"] for row in rows] == [2.0, 4.0]  # every 2 steps, the last one once
    for row in rows:
        terms = [row[key] for key in LOSS_COLUMNS[1:]]
        assert all(value > 0 for value in terms) and row["total"] > sum(terms[:3])
    assert rows[0] != rows[1]  # the student moved between the evaluations
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(validated_run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("val/total")] == [2, 4]
    assert (validated_run / "loss.png").stat().st_size > 0
    assert not (reference_run / VALIDATION_CSV).exists()


@pytest.mark.e2e
def test_killed_validated_run_resumes_to_the_same_losses_and_validation(artefacts, validated_run, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *_validated(artefacts, out)], env=TRAIN_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    metrics = out / "metrics.csv"
    while time.time() < deadline and process.poll() is None and \
            not (metrics.exists() and len(read_metrics(metrics)) >= 3):
        time.sleep(0.02)
    assert process.poll() is None, "training ended before it could be killed: " + process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2

    resumed = run_python(*_validated(artefacts, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert compared_columns(out / "metrics.csv") == compared_columns(validated_run / "metrics.csv")
    assert read_metrics(out / VALIDATION_CSV) == read_metrics(validated_run / VALIDATION_CSV)


def _evaluate(capsys, *argv):
    from train_student.__main__ import main
    status = main(["evaluate", *map(str, argv)])
    return status, capsys.readouterr()


def _per_image(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.e2e
def test_evaluate_reproduces_the_last_validation_per_image(artefacts, validated_run, tmp_path, capsys):
    out = tmp_path / "student.csv"
    status, printed = _evaluate(capsys, validated_run, "--store", artefacts["fresh"], "--out", out)
    assert status == 0, printed.err
    rows = _per_image(out)
    assert [row["image"] for row in rows] == ["0", "1", "2", "all"]
    last = read_metrics(validated_run / VALIDATION_CSV)[-1]
    for key in LOSS_COLUMNS:
        per_image = [float(row[key]) for row in rows[:-1]]
        assert float(rows[-1][key]) == pytest.approx(sum(per_image) / 3, rel=1e-12)
        assert float(rows[-1][key]) == pytest.approx(last[key], rel=1e-5)
    assert len({row["total"] for row in rows[:-1]}) == 3  # each image has its own loss

    ema, export = tmp_path / "ema.csv", tmp_path / "export.csv"
    assert _evaluate(capsys, validated_run, "--store", artefacts["fresh"], "--weights", "ema", "--out", ema)[0] == 0
    assert _evaluate(capsys, validated_run, "--store", artefacts["fresh"], "--export",
                     validated_run / "student_ema", "--out", export)[0] == 0
    assert _per_image(ema) == _per_image(export)  # the export is the checkpoint's EMA student
    assert _per_image(ema)[-1]["total"] != rows[-1]["total"]

    seen = tmp_path / "seen.csv"  # the run's own training views: all 6 images, beside the 3 fresh ones
    assert _evaluate(capsys, validated_run, "--store", artefacts["store"], "--training-views", "--out", seen)[0] == 0
    assert [row["image"] for row in _per_image(seen)] == ["0", "1", "2", "3", "4", "5", "all"]
    status, printed = _evaluate(capsys, validated_run, "--store", artefacts["fresh"], "--training-views")
    assert status == 2 and "not a store of the run's training views" in printed.err


@pytest.mark.e2e
def test_stores_that_do_not_fit_are_refused_in_one_line(artefacts, validated_run, tmp_path, capsys):
    status, printed = _evaluate(capsys, validated_run, "--store", artefacts["store"])
    assert status == 2 and "training store's --seed 0" in printed.err and "another --seed" in printed.err
    assert len(printed.err.strip().splitlines()) == 1
    # A store of other images than the ones named.
    status, printed = _evaluate(capsys, validated_run, "--store", artefacts["fresh"], "--images",
                                artefacts["backgrounds"])
    assert status == 2 and "is not the one it was cached from" in printed.err
    assert len(printed.err.strip().splitlines()) == 1

    out = tmp_path / "refused"
    done = run_python("-m", "train_student", *tiny_train_args(artefacts, out, "--val-store", str(artefacts["store"])))
    assert done.returncode == 2 and "training store's --seed 0" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was written


@pytest.mark.e2e
def test_dry_run_says_how_often_each_view_set_is_reused(artefacts, capsys):
    from cache_teacher.__main__ import main as cache_main
    assert cache_main(["run", "--teacher", "path-b", "--weights", "unused.pth", "--images", str(artefacts["images"]),
                       "--backgrounds", str(artefacts["backgrounds"]), "-K", "4", "--epochs", "200",
                       "--out", "unused.zarr", "--dry-run"]) == 0
    assert "K = 4 view sets per image over 200 epochs: each view set is used 50 times" in capsys.readouterr().out


@pytest.mark.parametrize("epochs, views_per_image", [(200, 4), (16, 16), (16, 1), (7, 3), (2, 5)])
def test_reuse_count_is_what_the_trainer_does(epochs, views_per_image):
    import numpy as np

    from formats.view_records import block_view_sets, view_set_uses
    used = np.stack([block_view_sets(3, 5, epoch, views_per_image) for epoch in range(epochs)])  # [epochs, blocks]
    counts = np.stack([np.bincount(used[:, block], minlength=views_per_image) for block in range(5)])
    assert (counts.min(), counts.max()) == view_set_uses(epochs, views_per_image)
