"""`make gpu-check` (acceptance/gpu_check.py) in its tiny CPU mode, end to end, so that the GPU acceptance
command cannot rot between leases; plus its refusals and its keep-going behaviour. No timing is asserted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "acceptance" / "gpu_check.py"


def _run(*args, timeout=2000):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="tiny mode is the CPU run")
def test_tiny_mode_runs_every_step_prints_the_table_last_and_writes_json(tmp_path):
    done = _run("--mode", "tiny", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["environment", "CUDA tests", "inputs", "train path-b_vit-ti", "cache pipeline", "kernels"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert report["environment"]["missing"] == {} and report["environment"]["gpu"] is None
    assert steps["CUDA tests"]["figures"]["collected"] > 0
    train = steps["train path-b_vit-ti"]["figures"]
    assert train["cached_step_samples_per_s"] > 0 and train["online_step_samples_per_s"] > 0
    assert 0 <= train["data_wait_share"] <= 1 and 0 < train["render_share"] <= 1
    assert steps["cache pipeline"]["figures"]["pipeline_view_sets_per_s"] > 0
    assert report["kernels"] and all(row["error"] is None for row in report["kernels"])
    last_lines = done.stdout.strip().splitlines()
    assert last_lines[-1].startswith("6 of 6 steps ok")
    assert any(line.startswith("| train path-b_vit-ti") or line.startswith("| path-b_vit-ti") for line in last_lines)


def test_a_spent_budget_skips_steps_records_them_and_still_prints_the_table(tmp_path):
    done = _run("--mode", "tiny", "--budget-s", "1", "--out", str(tmp_path), timeout=300)
    assert done.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["steps"] and all(s["status"] == "skipped" for s in report["steps"])
    assert report["steps"][0]["detail"] == "time budget spent"
    assert done.stdout.strip().splitlines()[-1].startswith("0 of 6 steps ok; not ok: environment")


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal of full mode without a GPU")
def test_full_mode_without_gpu_is_refused_in_one_line(tmp_path):
    done = _run("--mode", "full", "--out", str(tmp_path), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--mode full needs a CUDA GPU" in done.stderr


def test_a_folder_that_is_no_wheelhouse_is_named(tmp_path):
    done = _run("--wheelhouse", str(tmp_path / "nowhere"), "--out", str(tmp_path), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and str(tmp_path / "nowhere") in done.stderr
