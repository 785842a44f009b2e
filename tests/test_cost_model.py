"""The cost model prices the launches the ops make, and its before/after differ exactly where the kernels did."""
import json
from collections import Counter

import pytest
import torch
import triton

from kernels import cost_model, decoder_experts
from kernels._common import resident_programs
from dpal.config import DecoderSpec
from kernels.sweep import decoder_launches, relation_launches

from helpers import MEASURED_CEILINGS, launches_device_work

EXPERT_GEMM_PASSES = ("expert_stats", "expert_mix", "expert_grad_stats")


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
    names = [launch.name for launch in after]
    # Backward's expert part: seven du chunks, each with its dq and dW GEMMs, became the two flat passes.
    first, last = names.index("expert_weight_grad"), names.index("expert_query_grad")
    assert last == first + 1
    chunked = before[first:first + 21]
    assert [launch.name for launch in chunked] == ["expert_grad", "cuBLAS dq GEMM", "cuBLAS dW GEMM"] * 7
    unchanged_before, unchanged_after = before[:first] + before[first + 21:], after[:first] + after[last + 1:]
    assert len(unchanged_before) == len(unchanged_after)
    for old, new in zip(unchanged_before, unchanged_after):
        if old.name in EXPERT_GEMM_PASSES:
            # Per block of 64 samples: the queries were loaded for each of the 1152 column tiles of 128, and the
            # weight three times (once per pattern); now once per slice of columns, and the weight once. Now mix
            # also stores X = sum_e c_e xhat_e [B, M], which grad_stats reads in place of W_b (it makes W_b from X),
            # and grad_stats stores dW gamma [B, M] and per block of samples two per-column partials.
            row_blocks, slices = 4, new.programs // 4
            queries = 64 * DecoderSpec.num_patterns * 192 * cost_model.BF16
            mixed = 256 * 192 * 768 * cost_model.BF16
            added = {"expert_stats": 0, "expert_mix": mixed,
                     "expert_grad_stats": mixed + row_blocks * 2 * 192 * 768 * cost_model.F32}[old.name]
            assert old.programs == row_blocks * 1152 and slices < 1152
            assert old.l2_bytes - new.l2_bytes == pytest.approx(
                row_blocks * ((1152 - slices) * queries + 2 * 192 * 768 * 192 * cost_model.BF16) - added)
        elif old.name in decoder_experts.PER_SAMPLE_KERNELS:  # twice the column tiles' partials (64, not 128)
            assert new.l2_bytes == 2 * old.l2_bytes and new.programs == old.programs
        elif old.small:  # a dW copy per chunk is gone; dq's slices are summed instead
            assert (old.programs, new.programs) == (6 + 7, cost_model.DECODER_SMALL_OPS)
        else:
            assert old == new
    rel_before, rel_after = (cost_model.relation_launches(256, 257, 768, "int8", before=b) for b in (True, False))
    assert rel_before[0].l2_bytes - rel_after[0].l2_bytes == pytest.approx(4 * 64 * 768 * 2 * rel_before[0].programs)
    assert rel_before[1:-1] == rel_after[1:-1]  # backward's kernels and GEMM
    # The forward now finishes each row's share of the loss and backward scales the gradient in the kernels.
    assert (rel_before[-1].programs, rel_after[-1].programs) == (15, cost_model.RELATION_SMALL_OPS)


def test_dq_slices_fill_the_gpu_with_whole_column_tiles():
    config = decoder_experts.pick_config("query_grad", 192, 192 * 768, "bf16")
    per_sm = resident_programs(config.num_warps)
    # B = 256 and the B = 768 CLS call (6 and 18 row blocks of 128) on 132 SMs, one 8-warp program each
    for rows, wanted in ((768, 22), (2304, 7)):
        slices, span = decoder_experts.query_grad_slices(rows, 192 * 768, config, 132)
        assert slices == wanted and span % config["BLOCK_M"] == 0 and (slices - 1) * span < 192 * 768 <= slices * span
        assert 0.9 * per_sm * 132 <= slices * triton.cdiv(rows, config["BLOCK_R"]) <= per_sm * 132
    assert decoder_experts.query_grad_slices(768, 100, config, 132) == (2, 64)  # no more slices than column tiles
    assert decoder_experts.query_grad_slices(15, 3 * 64, config, None) == (3, 64)  # the interpreter: a few programs


def test_cli_prints_predictions_and_refuses_a_bad_ceiling(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert cost_model.main(["--l2-tbps", "7", "--json", str(out)]) == 0
    assert "PREDICTED" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [(m["name"], m["l2"]) for m in result["machines"]] == [("H100", 7e12), ("H200", 7e12)]
    totals = {(t["call"], t["kernels"], t["gpu"]): t for t in result["totals"]}
    assert len(totals) == 16
    for (call, kernels, gpu), total in totals.items():
        if kernels == "after":
            assert total["l2_gb"] < totals[(call, "before", gpu)]["l2_gb"]
            assert total["predicted_ms"] < totals[(call, "before", gpu)]["predicted_ms"]
    with pytest.raises(SystemExit):
        cost_model.main(["--l2-tbps", "0"])
    assert "--l2-tbps must be > 0, got 0.0" in capsys.readouterr().err


def test_measured_ceilings_price_one_machine_and_more_l2_bandwidth_never_costs_time():
    (gpu,) = cost_model.machines(ceilings=MEASURED_CEILINGS, name="NVIDIA H100 80GB HBM3")
    assert (gpu.hbm, gpu.gemm, gpu.l2, gpu.sms) == (3e12, 8e14, 6e12, 132) and "measured" in gpu.source
    faster = cost_model.machines(ceilings=dict(MEASURED_CEILINGS, l2_gbps=12000.0), name="faster L2")[0]
    for call, (op, shape) in cost_model.CALLS.items():
        slow, fast = (cost_model.predict(op, shape, m) for m in (gpu, faster))
        assert fast["predicted_ms"] <= slow["predicted_ms"] and slow["floor_ms"] == fast["floor_ms"], call
        assert sum(part["seconds"] for part in slow["parts"]) == pytest.approx(slow["predicted_ms"] / 1e3)


@pytest.mark.parametrize("target", ["fp16", "int8"])
def test_the_model_counts_the_launches_a_relation_call_makes(traced_kernels, target):
    # As for the decoder: an op trace of one call, forward and backward (N = 70: full tiles and a tail).
    from torch.profiler import ProfilerActivity, profile

    from dpal.losses import quantize_relation, relation_matrix
    from kernels import relation_loss

    batch, n, dim = 2, 70, 16
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(batch, n, dim, generator=generator).bfloat16().requires_grad_()
    probs = relation_matrix(torch.randn(batch, n, dim, generator=generator))
    targets, scale = quantize_relation(probs) if target == "int8" else (probs.half(), None)
    relation_loss.relation_kl(y, targets, scale).backward()  # the tile-pair tables are uploaded once per shape
    y.grad, grad_loss = None, torch.ones(())
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        loss = relation_loss.relation_kl(y, targets, scale)
        torch.autograd.backward(loss, grad_loss)
    made = _top_level_launches(trace)
    assert made["triton kernel"] == 3 and made["aten::bmm"] == 1  # forward; full and tail tiles; dY = G Y
    assert made.total() - 4 == cost_model.RELATION_SMALL_OPS
    assert made.total() == cost_model.predict("relation", (batch, n, dim, target), cost_model.machines()[0])[
        "launches"]


def test_least_time_counts_the_work_the_kernels_do_and_bounds_the_prediction():
    # u = q W^T + b is made at each of its five uses (LN_E's stats, the mix, grad_stats' sums, the dW and dq
    # passes), plus the two products with du; the output GEMM four times (forward, z again in backward, dh, dW_b).
    batch, dim, out_dim, tokens = shape = (256, 192, 768, 257)
    expert = 2.0 * batch * DecoderSpec.num_patterns * dim * dim * out_dim
    output = 2.0 * batch * tokens * dim * out_dim
    assert cost_model.executed_flops("decoder", shape) == pytest.approx(7 * expert + 4 * output)
    for m in cost_model.machines():
        for call, (op, call_shape) in cost_model.CALLS.items():
            priced = cost_model.predict(op, call_shape, m)
            assert priced["floor_ms"] <= priced["least_ms"] <= priced["predicted_ms"], (call, m.name)
            flops, nbytes = cost_model.floor_counts(op, call_shape)
            executed = cost_model.executed_flops(op, call_shape)
            assert executed >= flops  # the kernels do at least the useful work
            assert priced["least_ms"] == pytest.approx(1e3 * max(executed / m.gemm, nbytes / m.hbm))


def test_every_recipe_call_is_priced():
    # The bench predicts every fused row it measures on a GPU, at every recipe's calls.
    from kernels import shapes

    (gpu,) = cost_model.machines(ceilings=MEASURED_CEILINGS, name="GPU")
    for batch, _, dim, out_dim, tokens in shapes.decoder_calls():
        assert cost_model.predict("decoder", (batch, dim, out_dim, tokens), gpu)["predicted_ms"] > 0
    for batch, n, dim in shapes.relation_calls():
        for target in ("fp16", "int8"):
            assert cost_model.predict("relation", (batch, n, dim, target), gpu)["predicted_ms"] > 0


def test_the_l2_probe_reads_the_whole_buffer_every_pass():
    # In the interpreter on the CPU: what the probe's kernel reads, not its speed.
    from kernels import l2_probe

    programs, passes = 3, 4
    x = torch.arange(l2_probe.buffer_for(programs, "cpu").numel(), dtype=torch.float32) % 7
    sums = l2_probe.read_pass_sums(x, programs, passes)
    blocks = x.view(programs, -1).sum(1)
    assert sums.tolist() == [sum(blocks[(p + k) % programs].item() for k in range(passes)) for p in range(programs)]


@pytest.fixture
def traced_kernels(monkeypatch):
    """Each launch of a planned Triton kernel shows in a profiler trace as one "triton kernel" event."""
    from torch.profiler import record_function

    from kernels._common import PlannedLaunch

    real = PlannedLaunch.__call__

    def traced(planned, **tensors):
        with record_function("triton kernel"):
            real(planned, **tensors)
    monkeypatch.setattr(PlannedLaunch, "__call__", traced)


def _top_level_launches(trace) -> Counter:
    """The operators of a profiler trace that launch device work (the plan's kernels, recorded as "triton
    kernel", or a torch op with a kernel of its own), not counting those inside another such operator."""
    def launches(event):
        return event.name == "triton kernel" or launches_device_work(event.name)

    def top_level(event):
        parent = event.cpu_parent
        while parent is not None and not launches(parent):
            parent = parent.cpu_parent
        return parent is None
    return Counter(event.name for event in trace.events() if launches(event) and top_level(event))


@pytest.mark.parametrize("tokens", [7, 1], ids=["z-recomputed", "z-kept"])
def test_the_model_counts_the_launches_a_decoder_call_makes(traced_kernels, tokens):
    # An op trace of one call, forward and backward, as training makes it (bf16 activations, float32
    # parameters and scores): every top-level operator that launches device work is one of the plan's
    # kernels, a cuBLAS GEMM or one of the small ops the model counts, and one call stays within 20 launches.
    # With one token z is small beside W_b: backward copies it instead of recomputing it with a GEMM.
    from torch.profiler import ProfilerActivity, profile

    batch, dim, out_dim = 5, 24, 32
    kept = decoder_experts.keeps_output(tokens, dim)
    assert kept == (tokens == 1)
    features = dim * out_dim
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, 3, dim, generator=generator).bfloat16(), torch.rand(batch, 3).softmax(-1),
              torch.randn(batch, tokens, dim, generator=generator).bfloat16(),
              torch.randn(features, dim, generator=generator) / dim ** 0.5, torch.zeros(features),
              torch.ones(features), torch.zeros(features), torch.ones(out_dim), torch.zeros(out_dim)]
    for t in inputs:
        t.requires_grad_()
    grad_y, grad_loss = torch.randn(batch, tokens, out_dim, generator=generator).bfloat16(), torch.ones(())
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        y, loss = decoder_experts.expert_path(*inputs)
        torch.autograd.backward((y, loss), (grad_y, grad_loss))

    made = _top_level_launches(trace)
    small = made.total() - made["triton kernel"] - made["aten::bmm"] - made["aten::mm"]
    # stats, merge, mix; grad_stats, constants, the weight and query gradient passes; the two row kernels
    assert made["triton kernel"] == 3 + 4 + 2
    assert made["aten::bmm"] + made["aten::mm"] == 4 - kept  # the output stage
    assert small == cost_model.DECODER_SMALL_OPS + kept
    modelled = cost_model.decoder_launches(batch, dim, out_dim, tokens, before=False)
    assert made.total() == cost_model.predict("decoder", (batch, dim, out_dim, tokens), cost_model.machines()[0])[
        "launches"] == sum(launch.programs if launch.small or launch.gemm_tiles else 1 for launch in modelled) <= 20
