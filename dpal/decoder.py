"""Dynamic pattern decoder (spec section 5): maps student tokens into the teacher's space, one module
shared by the three patterns (0 global, 1 local, 2 relation).

The expert path (expert generation, gate mixing, output projection) is the hot spot; the module calls
it through the op `expert_path` (`dpal.dispatch.Op`), defined here by its plain-PyTorch reference
`expert_path_reference`; `kernels.register()` plugs the fused Triton op into it for CUDA tensors.

Correspondence with the original DPAL code's `adapter.*` parameters (for `dpal.compat`):

    this module                     original (adapter.)           note
    ------------------------------  ----------------------------  ------------------------------------
    down_proj                       down_dim                      only with inter_dim
    down_norm                       norm1                         only with inter_dim (unused otherwise)
    token_attn.in_proj_weight/bias  attn.qkv.weight/bias          timm Attention: same [q; k; v] rows
    token_attn.out_proj             attn.proj
    token_norm                      norm2                         LN2, after the residual
    gate_token [D]                  gate.moe_tokens [1, 1, D]     reshape
    gate_norm                       gate.norm
    gate_attn                       gate.cross_attn               nn.MultiheadAttention in both
    gate_weight [P, D]              gate.weight
    pattern_queries [P, D]          pattern_queries [1, P, D]     reshape
    query_self_attn.in_proj_*       attn2.qkv.*                   timm Attention, align_heads heads
    query_self_attn.out_proj        attn2.proj
    query_cross_norm                norm4
    query_cross_attn                cross_attn                    nn.MultiheadAttention, align_heads heads
    expert_query_norm               norm5                         LN5
    expert_proj                     mlp.0                         Linear D -> D * D_o
    expert_norm                     mlp.2                         LN_E over the whole D * D_o vector
    out_norm                        after_experts.norm            LN_o
    (none)                          norm3, expert_norm            unused in the original

Head counts: the original builds `attn2` and `cross_attn` with `align_num_heads` (16), the gate's
cross-attention with 12; every LayerNorm there uses eps 1e-6, kept here.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dpal.config import DecoderSpec
from dpal.dispatch import Op

# The original builds every decoder LayerNorm with eps 1e-6 (timm ViT's norm_layer); kept for parity.
LAYER_NORM_EPS = 1e-6


def expert_path_reference(queries: torch.Tensor, scores: torch.Tensor, h: torch.Tensor,
                          expert_weight: torch.Tensor, expert_bias: torch.Tensor,
                          expert_norm_weight: torch.Tensor, expert_norm_bias: torch.Tensor,
                          out_norm_weight: torch.Tensor, out_norm_bias: torch.Tensor, *,
                          mix_divisor: float = 256.0, experts_loss_weight: float = 0.025,
                          eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert generation, gate mixing and output projection: the kernel boundary of the decoder.

    queries [B,P,D] (= LN5(Q)), scores [B,P] (softmax gate), h [B,L,D]; expert_weight [D*D_o, D],
    expert_bias / expert_norm_* [D*D_o], out_norm_* [D_o]. Returns y [B,L,D_o] and experts_loss:
      E   = LN_E(GELU(queries W^T + b)) over the whole D*D_o vector, viewed [B,P,D,D_o]
      W_b = sum_e s_e E_e / mix_divisor
      experts_loss = experts_loss_weight * mean_b sum W_b^2
      y   = LN_o(GELU(h @ W_b))
    """
    batch, patterns, dim = queries.shape
    out_dim = out_norm_weight.shape[0]
    experts = F.gelu(F.linear(queries, expert_weight, expert_bias))
    experts = F.layer_norm(experts, experts.shape[-1:], expert_norm_weight, expert_norm_bias, eps)
    experts = experts.view(batch, patterns, dim, out_dim)
    mixed = torch.einsum("bp,bpio->bio", scores.to(experts.dtype), experts) / mix_divisor
    # Summed over D*D_o squares: accumulate in float32 at least, even under bf16 autocast.
    mixed_wide = mixed if mixed.dtype == torch.float64 else mixed.float()
    experts_loss = experts_loss_weight * mixed_wide.pow(2).sum(dim=(1, 2)).mean()
    y = F.gelu(torch.bmm(h.to(mixed.dtype), mixed))
    y = F.layer_norm(y, (out_dim,), out_norm_weight, out_norm_bias, eps)
    return y, experts_loss


# What the decoder calls: the reference unless an implementation is registered for the inputs' device.
expert_path = Op("expert_path", expert_path_reference)


class DecoderOutput(NamedTuple):
    y: torch.Tensor  # [B, L, D_o]
    aux_loss: torch.Tensor  # gate cross-entropy against the requested pattern
    experts_loss: torch.Tensor  # experts_loss_weight * mean_b sum W_b^2


class DynamicPatternDecoder(nn.Module):
    """x [B, L, D_s] and a pattern index -> DecoderOutput (spec section 5)."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        dim, out_dim, patterns = spec.in_dim, spec.out_dim, spec.num_patterns
        for name, heads in (("align_heads", spec.align_heads), ("gate_heads", spec.gate_heads)):
            if dim % heads:
                raise ValueError(f"decoder width {dim} is not divisible by {name}={heads}")
        self.down_proj = nn.Linear(spec.student_dim, dim) if spec.student_dim != dim else None
        self.down_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS) if self.down_proj is not None else None

        self.token_attn = nn.MultiheadAttention(dim, spec.align_heads, batch_first=True)
        self.token_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

        self.gate_token = nn.Parameter(torch.randn(dim))
        self.gate_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.gate_attn = nn.MultiheadAttention(dim, spec.gate_heads, batch_first=True)
        self.gate_weight = nn.Parameter(torch.empty(patterns, dim))

        self.pattern_queries = nn.Parameter(torch.zeros(patterns, dim))
        self.query_self_attn = nn.MultiheadAttention(dim, spec.align_heads, batch_first=True)
        self.query_cross_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.query_cross_attn = nn.MultiheadAttention(dim, spec.align_heads, batch_first=True)

        self.expert_query_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.expert_proj = nn.Linear(dim, dim * out_dim)
        self.expert_norm = nn.LayerNorm(dim * out_dim, eps=LAYER_NORM_EPS)
        self.out_norm = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's init: xavier-uniform linears (MHA projections included), zero biases, unit
        LayerNorms, gate weight kaiming-uniform(a=sqrt 5), gate token N(0, 1), pattern queries zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.xavier_uniform_(module.in_proj_weight)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.kaiming_uniform_(self.gate_weight, a=math.sqrt(5))
        nn.init.normal_(self.gate_token)
        nn.init.zeros_(self.pattern_queries)

    def forward(self, x: torch.Tensor, pattern: int) -> DecoderOutput:
        if not 0 <= pattern < self.spec.num_patterns:
            raise ValueError(f"pattern must be in [0, {self.spec.num_patterns}), got {pattern}")
        if x.dim() != 3 or x.shape[-1] != self.spec.student_dim:
            raise ValueError(f"decoder input must be [B, L, {self.spec.student_dim}], got {tuple(x.shape)}")
        if self.down_proj is not None:
            x = self.down_norm(F.gelu(self.down_proj(x)))
        batch = x.shape[0]
        x_in = x
        h = self.token_norm(x + self.token_attn(x, x, x, need_weights=False)[0])

        gate_query = self.gate_norm(self.gate_token).expand(batch, 1, -1)
        g = self.gate_attn(gate_query, h, h, need_weights=False)[0].squeeze(1)
        logits = F.linear(g, self.gate_weight)
        scores = logits.softmax(dim=-1)
        target = torch.full((batch,), pattern, dtype=torch.long, device=x.device)
        aux_loss = F.cross_entropy(logits, target)  # autocast runs it in float32

        # Q0 is the same for every sample, so its self-attention is computed once, then broadcast.
        queries = self.pattern_queries[None]
        queries = queries + self.query_self_attn(queries, queries, queries, need_weights=False)[0]
        queries = queries.expand(batch, -1, -1)
        normed = self.query_cross_norm(queries)
        queries = queries + self.query_cross_attn(normed, x_in, x_in, need_weights=False)[0]

        y, experts_loss = expert_path(
            self.expert_query_norm(queries), scores, h,
            self.expert_proj.weight, self.expert_proj.bias, self.expert_norm.weight, self.expert_norm.bias,
            self.out_norm.weight, self.out_norm.bias, mix_divisor=self.spec.mix_divisor,
            experts_loss_weight=self.spec.experts_loss_weight, eps=LAYER_NORM_EPS)
        return DecoderOutput(y, aux_loss, experts_loss)
