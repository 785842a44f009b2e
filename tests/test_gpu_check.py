"""`make gpu-check` (acceptance/gpu_check.py) in its tiny CPU mode: the exact GPU command rehearsed end to end
(so that it cannot rot), runs killed midway (what the output folder then holds), its refusals and its
keep-going behaviour. No timing is asserted."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "acceptance" / "gpu_check.py"


def _run(*args, timeout=2000):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


TINY_STEPS = ["environment", "kernels path-b_vit-ti", "inputs", "train path-b_vit-ti", "CUDA tests",
              "kernels all recipes", "cache pipeline"]


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="tiny mode is the CPU run")
def test_the_gpu_command_rehearsed_in_tiny_mode_runs_every_step_in_order(tmp_path):
    # The exact command a GPU machine runs (`make gpu-check`, same flags), with a budget, in its tiny mode.
    out = tmp_path / "out"
    done = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_PY={sys.executable}", f"GPU_CHECK_OUT={out}",
                           "GPU_CHECK_BUDGET=1500"], capture_output=True, text=True, cwd=REPO, timeout=2000)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == TINY_STEPS
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert report["environment"]["missing"] == {} and report["environment"]["gpu"] is None
    assert steps["CUDA tests"]["figures"]["collected"] > 0
    train = steps["train path-b_vit-ti"]["figures"]
    assert train["cached_step_samples_per_s"] > 0 and train["online_step_samples_per_s"] > 0
    assert 0 <= train["data_wait_share"] <= 1 and 0 < train["render_share"] <= 1
    assert steps["cache pipeline"]["figures"]["pipeline_view_sets_per_s"] > 0
    kernels = report["kernels"]
    assert kernels and all(row["error"] is None for row in kernels)
    assert [row["op"] for row in kernels][:1] == ["relation"]  # the first kernel step's rows come first
    assert {row["op"] for row in kernels} == {"relation", "decoder"}
    # OUT holds results and logs only: the inputs went to the work folder beside it.
    assert not (out / "data").exists() and (tmp_path / "out_work" / "data").is_dir()
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert "logs/train-bench-path-b_vit-ti.log" in archive.getnames()
    last_lines = done.stdout.strip().splitlines()
    assert last_lines[-1].startswith(f"{len(TINY_STEPS)} of {len(TINY_STEPS)} steps ok")
    assert any(line.startswith("| path-b_vit-ti") for line in last_lines)


def _wait_for(predicate, proc, timeout=600):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the point it was to be killed at"
        assert time.monotonic() < deadline, "the run never reached the point it was to be killed at"
        time.sleep(0.2)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="tiny mode is the CPU run")
@pytest.mark.parametrize("point", ["mid-kernels", "mid-inputs"])
def test_a_run_killed_midway_leaves_everything_measured_before(tmp_path, point):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--mode", "tiny", "--only", "kernels,train", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    bench = out / "kernels_path-b_vit-ti.json"
    try:
        if point == "mid-kernels":  # the first benchmark row is written, the benchmark still runs
            _wait_for(lambda: _json(bench).get("results"), proc)
        else:  # the kernel step is done, the inputs step under way
            _wait_for(lambda: (out / "logs" / "demo-data-path-b.log").exists(), proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    written = bench.stat().st_mtime_ns
    time.sleep(3)
    assert bench.stat().st_mtime_ns == written  # the command died with the run
    report = _json(out / "gpu_check.json")
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["environment"]["status"] == "ok" and report["environment"]["torch"]
    rows = _json(bench)["results"]
    assert rows and all(row["error"] is None and row["ms"] > 0 for row in rows)
    with tarfile.open(out / "logs.tar.gz") as archive:  # packed after every step
        names = archive.getnames()
    assert "logs/environment.log" in names
    if point == "mid-kernels":
        assert list(steps) == ["environment", "kernels path-b_vit-ti"] and _json(bench)["complete"] is False
        assert steps["kernels path-b_vit-ti"]["status"] == "pending"  # what the run was doing when killed
    else:
        assert steps["kernels path-b_vit-ti"]["status"] == "ok" and _json(bench)["complete"] is True
        assert steps["inputs"]["status"] == "pending"
        assert [_kernel_key(r) for r in report["kernels"]] == [_kernel_key(r) for r in rows]
        assert "logs/kernels-bench-path-b_vit-ti.log" in names
    assert {p.name for p in out.iterdir()} <= {"gpu_check.json", "logs", "logs.tar.gz", "kernels_path-b_vit-ti.json"}


def _kernel_key(row: dict) -> tuple:
    return row["op"], json.dumps(row["shape"], sort_keys=True), row["impl"]


def test_a_spent_budget_skips_steps_records_them_and_still_prints_the_table(tmp_path):
    done = _run("--mode", "tiny", "--budget-s", "1", "--out", str(tmp_path), timeout=300)
    assert done.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["steps"] and all(s["status"] == "skipped" for s in report["steps"])
    assert report["steps"][0]["detail"] == "time budget spent"
    assert done.stdout.strip().splitlines()[-1].startswith(f"0 of {len(TINY_STEPS)} steps ok; not ok: environment")


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal of full mode without a GPU")
def test_full_mode_without_gpu_is_refused_in_one_line(tmp_path):
    done = _run("--mode", "full", "--out", str(tmp_path), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--mode full needs a CUDA GPU" in done.stderr


def test_a_folder_that_is_no_wheelhouse_is_named(tmp_path):
    done = _run("--wheelhouse", str(tmp_path / "nowhere"), "--out", str(tmp_path), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and str(tmp_path / "nowhere") in done.stderr
