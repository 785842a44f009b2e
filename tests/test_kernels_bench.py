"""`python -m kernels.bench` runs end to end without a GPU and writes a complete report.

No timing is asserted (speed targets live in the benchmark's output, not in tests); this keeps the
command itself from rotting: every op and target format is timed and checked against float64, nothing
errors, and the floors table is there. The static cost report is checked on the session's sm_90 sweep.
"""
import json
import subprocess
import sys

import pytest

from kernels.bench import print_static, static_report


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
    floors = result["target_floors"]
    assert {row["op"] for row in floors} == {"decoder", "relation"}
    assert all(row["floor_ms_compute"] > 0 for row in floors)


def _check_static(static: dict) -> None:
    costs = static["costs"]
    kernels = {row["kernel"] for row in costs}
    assert {"expert_mix", "expert_grad", "relation_kl_fwd", "relation_kl_bwd", "gelu_layer_norm_bwd"} <= kernels
    assert all(row["spills"] == 0 and row["sass_per_element"] > 0 for row in costs)
    for gpu in ("H100", "H200"):
        # Per launch the predicted time is the largest of the floor and the issue, special-function and
        # tensor-core bounds, so a row (its launches summed) lies between the largest and the sum of its
        # bounds; and the instruction counts bind somewhere: a prediction that only ever equalled the floor
        # would say nothing the floor does not.
        for row in costs:
            bounds = (row[f"floor_ms_{gpu}"], row["issue_ms"], row["sfu_ms"], row["tensor_ms"])
            assert min(bounds) >= 0 and row[f"floor_ms_{gpu}"] > 0, row
            assert max(bounds) * (1 - 1e-9) <= row[f"predicted_ms_{gpu}"] <= sum(bounds) * (1 + 1e-9), row
        assert any(row[f"predicted_ms_{gpu}"] > row[f"floor_ms_{gpu}"] * 1.01 for row in costs), gpu
    # One total per call the acceptance names, each over every kernel the call runs.
    totals = {row["call"]: row for row in static["totals"]}
    assert set(totals) == {"decoder B768 L1", "decoder B256 L128", "decoder B256 L257", "relation fp16 targets",
                           "relation int8 targets"}
    assert totals["decoder B256 L257"]["kernels"] == 8 and totals["relation fp16 targets"]["kernels"] == 2


@pytest.mark.e2e
def test_static_cost_report_from_the_sm90_sweep(quick_sweep, capsys):
    static = static_report(quick_sweep)
    print_static(static)
    assert "static cost" in capsys.readouterr().out
    _check_static(static)


@pytest.mark.e2e
def test_the_static_checks_refuse_a_prediction_that_is_only_the_floor(quick_sweep):
    static = static_report(quick_sweep)
    static["costs"] = [dict(row, **{f"predicted_ms_{gpu}": row[f"floor_ms_{gpu}"] for gpu in ("H100", "H200")})
                       for row in static["costs"]]
    with pytest.raises(AssertionError):
        _check_static(static)
