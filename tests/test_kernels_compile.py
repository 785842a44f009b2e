"""Every Triton kernel lowers to an sm_90 (H100) cubin with the real compiler, on a machine without a GPU.

The interpreter that runs the kernels' numerical tests never lowers them to PTX; this test runs Triton's
compiler and ptxas in a child process where the kernels are defined compiled (TRITON_INTERPRET=0), so
GPU-only errors (types, layouts, shared memory) show up here.
"""
import os
import subprocess
import sys

from kernels import decoder_experts, relation_loss
from kernels._common import compile_for_gpu


def _compile_decoder_kernels():
    """Each decoder kernel for bf16 activations (the training dtype; fp32 lowers the same code
    with other dot inputs)."""
    types = {name: "i32" for name in ("B", "D", "M", "n_tiles", "m_start", "m_stop", "du_row_stride", "n_rows",
                                      "width", "rows_per_program")}
    types |= {name: "fp32" for name in ("inv_mix", "eps")}
    types |= {name: "*bf16" for name in ("q_ptr", "w_ptr", "mixed_ptr", "grad_ptr", "du_ptr", "z_ptr", "y_ptr",
                                         "dy_ptr")}
    types |= {name: "*fp32" for name in ("bias_ptr", "tile_mean_ptr", "tile_m2_ptr", "scores_ptr",
                                         "mean_ptr", "rstd_ptr", "gamma_ptr", "beta_ptr", "sq_partial_ptr",
                                         "loss_coef_ptr", "partial_ptr", "a_mean_ptr", "b_mean_ptr",
                                         "d_gamma_partial_ptr", "d_beta_partial_ptr", "d_bias_partial_ptr", "b_ptr",
                                         "dw_partial_ptr", "db_partial_ptr")}
    expert = dict(P=3, BLOCK_M=decoder_experts._BLOCK_M, DOT_PRECISION="ieee", UPCAST_DOT=False)
    for kernel in (decoder_experts._expert_stats_kernel, decoder_experts._expert_mix_kernel,
                   decoder_experts._expert_grad_stats_kernel):
        compile_for_gpu(kernel, types, expert)
    compile_for_gpu(decoder_experts._expert_grad_kernel, types, {k: v for k, v in expert.items() if k != "BLOCK_M"})
    # The row kernels' w_ptr is the LayerNorm weight (an fp32 parameter), not a GEMM operand.
    for kernel in (decoder_experts._gelu_layer_norm_fwd_kernel, decoder_experts._gelu_layer_norm_bwd_kernel):
        compile_for_gpu(kernel, types | {"w_ptr": "*fp32"}, dict(BLOCK=1024))


def _compile_relation_kernels():
    """Both relation kernels for bf16 tokens with float16 and with int8 targets."""
    for target, quantized in (("*fp16", False), ("*i8", True)):
        types = {"y_ptr": "*bf16", "out_ptr": "*bf16", "t_ptr": target, "N": "i32", "D": "i32", "scale": "fp32",
                 "row_scale_ptr": "*fp32" if quantized else target}
        types |= {name: "*fp32" for name in ("kl_ptr", "lse_ptr", "mass_ptr", "target_lse_ptr", "grad_ptr")}
        for kernel in (relation_loss._relation_kl_fwd_kernel, relation_loss._relation_kl_bwd_kernel):
            compile_for_gpu(kernel, types, dict(QUANTIZED=quantized, DOT_PRECISION="ieee", UPCAST_DOT=False))


def test_kernels_compile_for_h100():
    result = subprocess.run([sys.executable, __file__], env=dict(os.environ, TRITON_INTERPRET="0"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


if __name__ == "__main__":
    _compile_decoder_kernels()
    _compile_relation_kernels()
