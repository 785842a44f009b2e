"""The fused kernels compile for sm_90 (H100/H200) without spills and with wgmma, on a machine without a GPU.

The interpreter that runs the kernels' numerical tests never lowers them to PTX; these tests run Triton's
compiler and ptxas in child processes where the kernels are defined compiled (TRITON_INTERPRET=0).
`make test-all` runs the sweep's representative part (every kernel once, bf16 activations, every target
format, the B = 256 and the stacked-CLS B = 768, L = 1 calls); `make check-sm90` runs all of it.
A second check compiles two configs the project dropped, to show the sweep's checks catch what they claim.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import decoder_experts, relation_loss
from kernels._common import PlannedLaunch
from kernels.sweep import all_launches, operand_kind

COMPILED = dict(os.environ, TRITON_INTERPRET="0")
KERNELS = {"expert_stats", "expert_stats_merge", "expert_mix", "expert_grad_stats", "expert_grad_constants",
           "expert_weight_grad", "expert_query_grad", "gelu_layer_norm_fwd", "gelu_layer_norm_bwd", "relation_kl_fwd", "relation_kl_bwd",
           "l2_read"}  # the last: the bench's L2 probe


@pytest.mark.e2e
def test_quick_sweep_compiles_every_kernel_for_sm90(quick_sweep):
    rows = quick_sweep["rows"]
    assert {row["kernel"] for row in rows} == KERNELS
    assert all(not row["problems"] and row["facts"]["local_loads"] == row["facts"]["local_stores"] == 0
               for row in rows)
    assert all(row["facts"]["hgmma"] > 0 for row in rows if row["tensor_core"])
    relation_targets = {row["operands"] for row in rows if row["kernel"] == "relation_kl_fwd"}
    assert relation_targets == {f"bf16 / target {t}" for t in ("fp32", "fp16", "int8")}
    cases = {case for row in rows for case in row["cases"]}
    assert {"B768 D192 Do768 L1", "B256 D192 Do768 L257"} <= cases


@pytest.mark.e2e
def test_sweep_catches_spills_and_missing_wgmma():
    # Relation forward 64x64x32 with 4 warps and int8 targets spills (it was shipped once); a 32-row tile
    # (32 columns, K steps of 32, one stage: small enough to hold a row block's logits) compiles to warp-level
    # mma.sync (HMMA), not wgmma.
    script = textwrap.dedent("""
        import torch
        from kernels._common import KernelConfig, PlannedLaunch
        from kernels import relation_loss
        from kernels.sweep import relation_launches, run
        spilling = KernelConfig.of(4, 3, BLOCK_I=64, BLOCK_J=64, BLOCK_K=32)
        narrow = KernelConfig.of(4, 1, BLOCK_I=32, BLOCK_J=32, BLOCK_K=32)
        launches = []
        for config in (spilling, narrow):
            relation_loss.PINNED_CONFIGS[("fwd", 257, 768, "bf16")] = config
            relation_loss.launch_plan.cache_clear()  # planned once per shape: plan again with this config
            launches.append(relation_launches(256, 257, 768, "bf16", "int8")[0])
        for row in run(launches, workers=2):
            print(row.config, "|", "; ".join(row.problems))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=COMPILED, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = dict(line.split(" | ") for line in done.stdout.strip().splitlines())
    assert "register spills" in lines["I64 J64 K32 w4 s3"]
    assert "no wgmma (HGMMA) in SASS" in lines["I32 J32 K32 w4 s1"] and "spills" not in lines["I32 J32 K32 w4 s1"]


def test_configs_are_pinned_and_shared_by_every_call():
    # No autotuner: the config is a pure function of (kernel, shape, dtype), so ranks and resumes agree.
    for module in (decoder_experts, relation_loss):
        assert not any(type(v).__name__ == "Autotuner" for v in vars(module).values())
    assert relation_loss.pick_config("fwd", 257, 768, "bf16") == relation_loss.PINNED_CONFIGS[("fwd", 257, 768, "bf16")]
    # Off the table: the operand kind's default.
    assert relation_loss.pick_config("bwd", 70, 40, "fp32") == relation_loss.DEFAULT_CONFIGS["bwd"]["fp32"]
    assert decoder_experts.pick_config("weight_grad", 24, 480, "fp32") == \
        decoder_experts.DEFAULT_CONFIGS["weight_grad"]["fp32"]
    # Every config either table holds (pinned or default) is one the full sweep compiles, for that kernel
    # and operand kind.
    swept = {(launch.kernel_name, operand_kind(launch), launch.config) for launch in all_launches(quick=False)}

    def assert_swept(kernel_name, kind, config):
        key = (kernel_name, kind, config.label)
        assert key in swept, key

    def relation_tiles(kernel, config):  # backward's tiles are square: its launches add BLOCK_J = BLOCK_I
        if kernel == "fwd":
            return config
        return config.with_tiles(BLOCK_J=config["BLOCK_I"])

    for (kernel, n, dim, kind), config in relation_loss.PINNED_CONFIGS.items():
        assert_swept(f"relation_kl_{kernel}", kind, relation_tiles(kernel, config))
    for kernel, by_kind in relation_loss.DEFAULT_CONFIGS.items():
        for kind, config in by_kind.items():
            assert_swept(f"relation_kl_{kernel}", kind, relation_tiles(kernel, config))
    for kernel, dim, features, kind in decoder_experts.PINNED_CONFIGS:
        assert_swept(f"expert_{kernel}", kind, decoder_experts.pick_config(kernel, dim, features, kind))
    for kernel, by_kind in decoder_experts.DEFAULT_CONFIGS.items():
        for kind in by_kind:
            assert_swept(f"expert_{kernel}", kind, decoder_experts.pick_config(kernel, 1, 1, kind))


def test_plans_read_no_process_global_precision_setting():
    # Another thread (or the trainer) may switch torch's TF32 setting during a run: a launch must not change.
    before = relation_loss.launch_plan(2, 70, 40, torch.float32, torch.float16)
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        during = relation_loss.launch_plan(2, 70, 40, torch.float32, torch.float16)
        decoder_plan = decoder_experts.expert_plan(5, 3, 24, 20, torch.float32, torch.float32, 256.0, 0.025, 1e-5,
                                                   None)
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    assert during == before and during["forward"].scalars["DOT_PRECISION"] == "ieee"
    assert during["forward"].config == relation_loss.DEFAULT_CONFIGS["fwd"]["fp32"]
    dotted = [p for p in decoder_plan["forward"] + decoder_plan["backward"] if "DOT_PRECISION" in p.scalars]
    assert len(dotted) == 5 and all(p.scalars["DOT_PRECISION"] == "ieee" for p in dotted)


def _described(kernel_name, args: dict) -> tuple:
    """A launch as comparable data: tensors by dtype, floats rounded; the interpreter-only switch dropped."""
    def value(v):
        if isinstance(v, torch.Tensor):
            return str(v.dtype)
        if isinstance(v, torch.dtype):
            return str(v)
        return round(v, 6) if isinstance(v, float) else v
    return kernel_name, tuple(sorted((k, value(v)) for k, v in args.items() if k not in ("UPCAST_DOT", "INTERPRETED")))


def _record_launches(monkeypatch) -> list:
    """Every planned launch the ops issue, described with the dtypes of the tensors they really pass."""
    recorded, real = [], PlannedLaunch.__call__

    def record(planned, **tensors):
        name = planned.kernel_name
        recorded.append(_described(name, tensors | planned.scalars | dict(planned.config.tiles)))
        real(planned, **tensors)
    monkeypatch.setattr(PlannedLaunch, "__call__", record)
    return recorded


def test_sweep_lists_what_the_ops_launch(monkeypatch):
    # The ops run (interpreted) at small shapes; every launch they make must be one the sweep lists for
    # that shape (both come from the ops' launch plans), and the tensors they pass must have the dtypes the
    # plans declare (the sweep compiles for those).
    from dpal.losses import quantize_relation, relation_matrix
    from kernels.sweep import decoder_launches, relation_launches

    recorded = _record_launches(monkeypatch)
    y = torch.randn(2, 70, 40, dtype=torch.bfloat16, requires_grad=True)
    codes, scale = quantize_relation(relation_matrix(torch.randn(2, 70, 40)))
    relation_loss.relation_kl(y, codes, scale).backward()
    listed = [_described(l.kernel_name, l.args) for l in relation_launches(2, 70, 40, "bf16", "int8")]
    assert recorded == listed

    recorded.clear()
    batch, dim, out_dim, tokens = 5, 24, 20, 7
    features = dim * out_dim
    inputs = [torch.randn(batch, 3, dim, dtype=torch.bfloat16), torch.rand(batch, 3).softmax(-1),
              torch.randn(batch, tokens, dim, dtype=torch.bfloat16),
              torch.randn(features, dim) / dim ** 0.5, torch.zeros(features),  # float32, as training holds it
              torch.ones(features), torch.zeros(features), torch.ones(out_dim), torch.zeros(out_dim)]
    for t in inputs:
        t.requires_grad_()
    y, loss = decoder_experts.expert_path(*inputs, eps=1e-6)  # the decoder's eps, as the sweep lists it
    (y.float().square().mean() + loss).backward()
    listed = [_described(l.kernel_name, l.args) for l in decoder_launches(batch, 3, dim, out_dim, tokens, "bf16",
                                                                               sm_count=None)]
    assert sorted(recorded) == sorted(listed)  # the ops interleave the row kernels with the expert passes
