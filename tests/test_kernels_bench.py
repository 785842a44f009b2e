"""`python -m kernels.bench` runs end to end without a GPU and writes a complete report.

No timing is asserted (speed targets live in the benchmark's output, not in tests); this keeps the
command itself from rotting: every op and target format is timed and checked against float64, nothing
errors, the floors table is there, and the static cost report from the sm_90 cubins is complete.
"""
import json
import subprocess
import sys


def test_bench_without_gpu_says_so_and_writes_every_row(tmp_path):
    report = tmp_path / "kernels.json"
    done = subprocess.run([sys.executable, "-m", "kernels.bench", "--no-compile", "--json", str(report)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NO GPU" in done.stdout and "interpreter" in done.stdout
    result = json.loads(report.read_text())
    assert result["interpreted"] is True and result["complete"] is True
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
    static = result["static"]
    kernels = {row["kernel"] for row in static["costs"]}
    assert {"expert_mix", "expert_grad", "relation_kl_fwd", "relation_kl_bwd", "gelu_layer_norm_bwd"} <= kernels
    assert all(row["spills"] == 0 and row["predicted_ms_H200"] >= row["floor_ms_H200"] > 0 and
               row["sass_per_element"] > 0 for row in static["costs"])
    assert "static cost" in done.stdout
    # One total per call of the target recipe, each from every kernel the call runs, never below its floor.
    totals = {row["call"]: row for row in static["totals"]}
    assert set(totals) == {"decoder B768 L1", "decoder B256 L128", "decoder B256 L257", "relation fp16 targets",
                           "relation int8 targets"}
    assert totals["decoder B256 L257"]["kernels"] == 6 and totals["relation fp16 targets"]["kernels"] == 2
    assert all(row["ratio_H100"] >= 1 and row["ratio_H200"] >= 1 for row in totals.values())
