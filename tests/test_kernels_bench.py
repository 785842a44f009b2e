"""`python -m kernels.bench` runs end to end without a GPU and writes a complete report.

No timing is asserted (speed targets live in the benchmark's output, not in tests); this keeps the
command itself from rotting: every op and target format is timed and checked against float64, nothing
errors, and the floors table is there. The compile facts and the check of the cost model's bytes against the
SASS are checked on the session's sm_90 sweep.
"""
import json
import subprocess
import sys
from dataclasses import replace

import pytest

from helpers import MEASURED_CEILINGS
from kernels import cost_model
from kernels.bench import Result, add_prediction, print_static, print_table, static_report
from kernels.sweep import byte_check, byte_check_failed


def test_bench_without_gpu_says_so_and_writes_every_row(tmp_path):
    report = tmp_path / "kernels.json"
    done = subprocess.run([sys.executable, "-m", "kernels.bench", "--no-compile", "--no-static", "--json", str(report)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NO GPU" in done.stdout and "interpreter" in done.stdout
    result = json.loads(report.read_text())
    assert result["interpreted"] is True and result["complete"] is True and "static" not in result
    rows = result["results"]
    assert all(row["error"] is None and row["ms"] > 0 for row in rows)
    assert {(row["op"], row["impl"]) for row in rows} == {(op, impl) for op in ("decoder", "relation")
                                                          for impl in ("eager", "fused")}
    assert {row["shape"]["target"] for row in rows if row["op"] == "relation"} == {"float16", "int8"}
    # Every row is checked against the float64 reference (float32 in the interpreter: within rounding).
    assert all(row["nan"] is False and 0 <= row["max_rel_err"] < 1e-4 for row in rows)
    # No GPU: no probe, no prediction beside interpreter timings; the cost model's report at stated ceilings.
    assert "l2_gbps" not in result["ceilings"] and all(row["predicted_ms"] is None for row in rows)
    assert "PREDICTED" in done.stdout and "no probe ran" in done.stdout
    assert [m["source"] for m in result["predictions"]["machines"]] == ["stated; L2 assumed"] * 2
    floors = result["target_floors"]
    assert {row["op"] for row in floors} == {"decoder", "relation"}
    assert all(row["floor_ms_compute"] > 0 for row in floors)


def test_fused_rows_carry_the_cost_models_prediction_beside_the_measurement(capsys):
    # What the bench does on a GPU after each row, here with ceilings as a GPU's measurement gives them.
    import torch

    (gpu,) = cost_model.machines(ceilings=MEASURED_CEILINGS, name="GPU")
    shape = dict(batch=256, dim=192, out_dim=768, tokens=257, dtype=str(torch.bfloat16))
    fused, eager = (Result("decoder", shape, ["path-b_vit-ti"], impl, ms=2.0, tflops=1.0, gbps=1.0)
                    for impl in ("fused", "eager"))
    for row in (fused, eager):
        add_prediction(row, gpu)
    assert fused.predicted_ms == pytest.approx(cost_model.predict("decoder", (256, 192, 768, 257), gpu)["predicted_ms"])
    assert fused.measured_over_predicted == pytest.approx(2.0 / fused.predicted_ms)
    assert eager.predicted_ms is None  # the model prices the fused op only
    print_table([fused, eager], dict(MEASURED_CEILINGS, matmul="bf16", copy="1 GiB", l2="probe"), "GPU")
    out = capsys.readouterr().out
    assert f"{fused.predicted_ms:8.3f}" in out and "measured / predicted" in out and "L2 -> SM read 6000" in out


def _check_static(static: dict) -> None:
    executed = static["executed"]
    kernels = {row["kernel"] for row in executed}
    assert {"expert_mix", "expert_weight_grad", "expert_query_grad", "relation_kl_fwd", "relation_kl_bwd", "gelu_layer_norm_bwd"} <= kernels
    assert all(row["spills"] == 0 and row["sass_per_element"] > 0 for row in executed)
    assert not any(key.endswith("_ms") or "predicted" in key for row in executed for key in row)  # counts only
    # Every Triton launch of the cost model's calls is held against its SASS, and all but the per-sample
    # kernels are checked.
    checked = static["byte_check"]
    assert {row["call"] for row in checked} == set(cost_model.CALLS)
    assert {row["launch"] for row in checked if row["verdict"] == "ok"} >= {
        "expert_stats", "expert_mix", "expert_grad_stats", "expert_weight_grad", "expert_query_grad",
        "gelu_layer_norm_fwd",
        "gelu_layer_norm_bwd", "relation_kl_fwd", "relation_kl_bwd", "relation_kl_bwd (tail)"}
    assert not byte_check_failed(checked)


@pytest.mark.e2e
def test_static_report_from_the_sm90_sweep(quick_sweep, capsys):
    static = static_report(quick_sweep)
    print_static(static)
    out = capsys.readouterr().out
    assert "compile facts" in out and "L2 -> SM bytes per program" in out and "predicted" not in out
    _check_static(static)


def _failed_with(quick_sweep, monkeypatch, op, name, change) -> dict:
    """The byte check's failed rows, {(call, launch): verdict}, when the cost model's launches named `name` of
    `op` ("decoder" or "relation") are changed by `change(launch, batch)`."""
    real = getattr(cost_model, f"{op}_launches")

    def changed(batch, *args, **kwargs):
        return [change(launch, batch) if launch.name == name else launch for launch in real(batch, *args, **kwargs)]
    monkeypatch.setattr(cost_model, f"{op}_launches", changed)
    return {(row["call"], row["launch"]): row["verdict"]
            for row in byte_check_failed(byte_check(quick_sweep["byte_check"]))}


@pytest.mark.e2e
def test_the_byte_check_fails_a_model_with_a_wrong_tile(quick_sweep, monkeypatch):
    # The model's expert_mix loading its 64 samples' queries again for every column tile of 64, as if it did
    # not hold them: the check against the SASS must refuse it, and only it.
    queries = 64 * 3 * 192 * cost_model.BF16

    def reloading(launch, batch):
        tiles_per_program = (batch // 64) * (192 * 768 // 64) / launch.programs
        return replace(launch, l2_bytes=launch.l2_bytes + (tiles_per_program - 1) * queries * launch.programs)
    failed = _failed_with(quick_sweep, monkeypatch, "decoder", "expert_mix", reloading)
    assert set(failed) == {("decoder B256 L257", "expert_mix"), ("decoder CLS B768 L1", "expert_mix")}


@pytest.mark.e2e
def test_the_byte_check_fails_a_model_that_holds_more_programs_per_sm_than_fit(quick_sweep, monkeypatch):
    # The model holding four weight-gradient programs per SM where the binary's registers leave room for two:
    # about half the waves (5 instead of 9 for 2304 programs). The check must refuse it, and only it.
    failed = _failed_with(quick_sweep, monkeypatch, "decoder", "expert_weight_grad",
                          lambda launch, batch: replace(launch, per_sm=4))
    assert set(failed) == {("decoder B256 L257", "expert_weight_grad"), ("decoder CLS B768 L1", "expert_weight_grad")}
    assert all("9 waves, not 5" in verdict for verdict in failed.values())


@pytest.mark.e2e
def test_the_byte_check_fails_a_model_with_a_wgmma_the_sass_does_not_have(quick_sweep, monkeypatch):
    # The model pricing the relation forward's tensor-core time at a wgmma twice as wide as the one emitted.
    failed = _failed_with(quick_sweep, monkeypatch, "relation", "relation_kl_fwd",
                          lambda launch, batch: replace(launch, wgmma=2 * launch.wgmma))
    assert set(failed) == {("relation fp16 targets", "relation_kl_fwd"), ("relation int8 targets", "relation_kl_fwd")}
    assert all("the SASS's is 64x" in verdict for verdict in failed.values())
