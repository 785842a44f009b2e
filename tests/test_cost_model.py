"""The cost model prices the launches the ops make, and its before/after differ exactly where the kernels did."""
import json
from collections import Counter

import pytest

from kernels import cost_model, decoder_experts
from dpal.config import DecoderSpec
from kernels.sweep import decoder_launches, relation_launches


def test_wgmma_efficiency_follows_shared_memory_reads():
    assert cost_model.wgmma_efficiency(64) == cost_model.wgmma_efficiency(256) == 1.0
    assert cost_model.wgmma_efficiency(32) == pytest.approx(2 / 3)
    assert cost_model.wgmma_efficiency(16) == pytest.approx(0.4)
    # 8 warps on 64 rows: two warpgroups split the columns; 4 warps keep them.
    assert cost_model.wgmma_n(64, 64, 8) == 32 and cost_model.wgmma_n(64, 64, 4) == 64
    assert cost_model.wgmma_n(64, 128, 8) == 64


def _triton_launches(plan):
    return Counter((launch.name.split(" ")[0], launch.programs) for launch in plan
                   if not launch.small and not launch.gemm_tiles)


@pytest.mark.parametrize("shape", [(256, 192, 768, 257), (768, 192, 768, 1)], ids=["B256", "CLS-B768"])
def test_model_prices_the_kernels_the_decoder_launches(shape):
    # The sweep's launch list is the one the ops make (tests/test_kernels_compile.py checks that).
    batch, *rest = shape
    listed = Counter((launch.kernel_name, launch.programs)
                     for launch in decoder_launches(batch, DecoderSpec.num_patterns, *rest, "bf16"))
    assert _triton_launches(cost_model.decoder_launches(*shape, before=False)) == listed


@pytest.mark.parametrize("target", ["fp16", "int8"])
def test_model_prices_the_kernels_the_relation_op_launches(target):
    listed = Counter((launch.kernel_name, launch.programs)
                     for launch in relation_launches(256, 257, 768, "bf16", target))
    assert _triton_launches(cost_model.relation_launches(256, 257, 768, target, before=False)) == listed


def test_before_and_after_differ_where_the_kernels_changed():
    before, after = (cost_model.decoder_launches(256, 192, 768, 257, before=b) for b in (True, False))
    for old, new in zip(before, after):
        assert old.name == new.name
        if old.name.startswith("expert_"):  # three weight-tile loads per K step became one
            c = decoder_experts.pick_config(old.name.removeprefix("expert_"), 192, 192 * 768, "bf16")
            weight_per_program = c["BLOCK_M"] * 192 * cost_model.BF16 * (1 if old.name != "expert_grad" else 4)
            assert old.l2_bytes - new.l2_bytes == pytest.approx(2 * weight_per_program * old.programs)
        elif old.name == "cuBLAS dq GEMM":  # split-K: the slices' tiles fill the SMs
            assert old.gemm_tiles == 12 and new.gemm_tiles >= 120
        else:
            assert old == new
    rel_before, rel_after = (cost_model.relation_launches(256, 257, 768, "int8", before=b) for b in (True, False))
    assert rel_before[0].l2_bytes - rel_after[0].l2_bytes == pytest.approx(4 * 64 * 768 * 2 * rel_before[0].programs)
    assert rel_before[1:] == rel_after[1:]


def test_dq_splits_divide_the_chunk_and_fill_the_gpu():
    chunk = decoder_experts.du_chunk_columns(256, 3, 192 * 768)
    for columns in (chunk, 192 * 768 - 6 * chunk):
        splits = decoder_experts.k_splits(768, columns, 192, 132)
        assert columns % splits == 0 and 10 <= splits <= 11
    assert decoder_experts.k_splits(768, 130, 192, 132) == 1  # too short to split


def test_cli_prints_predictions_and_refuses_a_bad_ceiling(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert cost_model.main(["--l2-tbps", "7", "--json", str(out)]) == 0
    assert "PREDICTED" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["l2_tbps"] == 7
    totals = {(t["call"], t["kernels"], t["gpu"]): t for t in result["totals"]}
    assert len(totals) == 16
    for (call, kernels, gpu), total in totals.items():
        if kernels == "after":
            assert total["l2_gb"] < totals[(call, "before", gpu)]["l2_gb"]
            assert total["predicted_ms"] < totals[(call, "before", gpu)]["predicted_ms"]
    with pytest.raises(SystemExit):
        cost_model.main(["--l2-tbps", "0"])
    assert "--l2-tbps must be > 0, got 0.0" in capsys.readouterr().err
