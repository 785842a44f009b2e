"""Original DPAL training checkpoints -> Student + DynamicPatternDecoder.

The reference below re-states the original modules with the original's parameter names (ViT student with
its own last-block head count and `inter_norm`, and the `LossMOEDecoder` adapter with its gate, pattern
queries, expert MLP and the unused norm3 / expert_norm). A synthetic checkpoint is written in the original
layout from random weights, converted, and the outputs compared."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpal.checkpoints import CheckpointError, load_checkpoint_file
from dpal.compat import convert_original_state, load_original_checkpoint
from dpal.config import DecoderSpec
from dpal.decoder import DynamicPatternDecoder
from dpal.recipes import get_recipe
from dpal.students import build_student
from helpers import RefAttention  # fused-qkv attention with timm's names, as the original's

EPS = 1e-6  # the original's norm_layer


class OriginalBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=EPS), nn.LayerNorm(dim, eps=EPS)
        self.attn = RefAttention(dim, heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class OriginalViT(nn.Module):
    """The original student ViT at its training size 256x128 (no position resizing needed there)."""

    def __init__(self, dim, heads, last_heads, depth=12):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + 16 * 8, dim))
        self.blocks = nn.ModuleList([OriginalBlock(dim, heads) for _ in range(depth - 1)]
                                    + [OriginalBlock(dim, last_heads)])
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.inter_norm = nn.LayerNorm(dim, eps=EPS)  # norm of an intermediate output nothing uses

    def forward(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class OriginalGate(nn.Module):
    def __init__(self, dim, patterns=3):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.moe_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.cross_attn = nn.MultiheadAttention(dim, 12, batch_first=True)
        self.weight = nn.Parameter(torch.zeros(patterns, dim))

    def forward(self, h, pattern):
        token = self.norm(self.moe_tokens).expand(len(h), -1, -1)
        logits = self.cross_attn(token, h, h)[0][:, 0] @ self.weight.t()
        target = torch.full((len(h),), pattern, dtype=torch.long)
        return logits.softmax(dim=-1), F.cross_entropy(logits, target)


class OriginalAdapter(nn.Module):
    """The original LossMOEDecoder's forward, names as in its state dict."""

    def __init__(self, student_dim, out_dim, inter_dim=None, heads=16):
        super().__init__()
        dim = inter_dim or student_dim
        self.dim, self.out_dim, self.inter_dim = dim, out_dim, inter_dim
        if inter_dim:
            self.down_dim = nn.Linear(student_dim, inter_dim)
        self.norm1, self.norm2, self.norm3, self.norm4, self.norm5 = (nn.LayerNorm(dim, eps=EPS) for _ in range(5))
        self.attn, self.attn2 = RefAttention(dim, heads), RefAttention(dim, heads)
        self.gate = OriginalGate(dim)
        self.after_experts = nn.Module()
        self.after_experts.norm = nn.LayerNorm(out_dim, eps=EPS)
        self.pattern_queries = nn.Parameter(torch.zeros(1, 3, dim))
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * out_dim), nn.GELU(), nn.LayerNorm(dim * out_dim, eps=EPS))
        self.expert_norm = nn.LayerNorm(out_dim, eps=EPS)  # created, never used

    def forward(self, x, pattern):
        batch = len(x)
        if self.inter_dim:
            x = self.norm1(F.gelu(self.down_dim(x)))
        h = self.norm2(x + self.attn(x))
        scores, aux = self.gate(h, pattern)
        queries = self.pattern_queries.expand(batch, -1, -1)
        queries = queries + self.attn2(queries)
        queries = queries + self.cross_attn(self.norm4(queries), x, x)[0]
        experts = self.mlp(self.norm5(queries)).reshape(batch, 3, self.dim, self.out_dim)
        mixed = (experts * scores[:, :, None, None]).sum(dim=1) / 256
        experts_loss = 0.025 * mixed.pow(2).sum(dim=(1, 2)).mean()
        y = self.after_experts.norm(F.gelu(h @ mixed))
        return y, aux, experts_loss


class OriginalModel(nn.Module):
    def __init__(self, recipe, adapter_dims=None):
        super().__init__()
        s = recipe.student
        self.backbone = OriginalViT(s.width, s.num_heads, recipe.teacher.num_heads)
        self.adapter = OriginalAdapter(*(adapter_dims or (s.width, recipe.teacher.width, s.inter_dim)))


def randomize(module, seed):
    """Every parameter random (norms around 1), so that each one must be mapped to its right place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            is_norm_weight = p.dim() == 1 and name.endswith("weight")  # only LayerNorms have 1-D weights
            p.copy_(1 + 0.2 * noise if is_norm_weight else noise / math.sqrt(max(p.shape[-1], 1)))
    return module


def original_checkpoint(model, ema, model_name="DPAL_kd_vit_tiny_patch16_moe"):
    return {"student": {"module." + k: v for k, v in model.state_dict().items()},
            "teacher": dict(ema.state_dict()),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "epoch": 7,
            "args": argparse.Namespace(model=model_name, teacher_model="expert_vit_base", height=256, width=128)}


@pytest.fixture(scope="module")
def vit_ti_checkpoint(tmp_path_factory):
    recipe = get_recipe("path-b_vit-ti")
    model = randomize(OriginalModel(recipe), 0).eval()
    ema = copy.deepcopy(model)  # an EMA copy: differs from the student in every (non-zero) number
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.9)
    path = tmp_path_factory.mktemp("original") / "checkpoint0199.pth"
    torch.save(original_checkpoint(model, ema), path)
    return path, model, ema


def test_converted_student_and_decoder_reproduce_the_original(vit_ti_checkpoint):
    path, model, ema = vit_ti_checkpoint
    torch.manual_seed(0)
    images = torch.randn(2, 3, 256, 128)
    for weights, reference in [("student", model), ("ema", ema)]:
        converted = load_original_checkpoint(path, weights=weights)  # recipe from args.model
        assert converted.recipe.name == "path-b_vit-ti" and converted.epoch == 7
        assert converted.student.backbone.blocks[-1].attn.num_heads == 12
        with torch.no_grad():
            out = converted.student(images)
            tokens = reference.backbone(images)
            torch.testing.assert_close(torch.cat([out.cls, out.patches], dim=1), tokens, rtol=1e-4, atol=1e-4)
            for pattern, inputs in [(0, tokens[:, :1]), (1, tokens[:, 1:]), (2, tokens)]:
                y, aux, experts_loss = converted.decoder(inputs, pattern)
                ref_y, ref_aux, ref_experts_loss = reference.adapter(inputs, pattern)
                torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(experts_loss, ref_experts_loss, rtol=1e-5, atol=1e-8)


def test_inter_dim_decoder_maps_down_projection_and_norm1():
    """ViT-B's decoder (inter_dim): down_dim + norm1 are used; shrunk widths keep the test fast."""
    base = get_recipe("path-b_vit-ti")
    recipe = dataclasses.replace(base, student=dataclasses.replace(base.student, inter_dim=96),
                                 decoder=DecoderSpec(in_dim=96, out_dim=64, student_dim=192))
    model = randomize(OriginalModel(recipe, adapter_dims=(192, 64, 96)), 2).eval()
    student, decoder = build_student(recipe), DynamicPatternDecoder(recipe.decoder)
    container = {"module." + k: v for k, v in model.state_dict().items()}
    student_state, decoder_state = convert_original_state(container, recipe, student, decoder, "synthetic", "student")
    decoder.load_state_dict(decoder_state, strict=True)
    x = torch.randn(2, 17, 192)
    with torch.no_grad():
        for pattern in range(3):
            for ours, ref in zip(decoder.eval()(x, pattern), model.adapter(x, pattern)):
                torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_bad_checkpoints_name_keys_and_layout(vit_ti_checkpoint, tmp_path):
    path = vit_ti_checkpoint[0]
    checkpoint = load_checkpoint_file(path)
    student = checkpoint["student"]
    del student["module.adapter.mlp.0.bias"]
    student["module.adapter.extra_head.weight"] = torch.zeros(3)
    student["module.backbone.blocks.3.attn.qkv.weight"] = torch.zeros(5, 192)
    broken = tmp_path / "broken.pth"
    torch.save(checkpoint, broken)
    with pytest.raises(CheckpointError) as error:
        load_original_checkpoint(broken)
    message = str(error.value)
    assert str(broken) in message and "original DPAL training checkpoint" in message
    assert "missing keys (1): module.adapter.mlp.0.bias" in message
    assert "unexpected keys (1): module.adapter.extra_head.weight" in message
    assert "module.backbone.blocks.3.attn.qkv.weight (file [5, 192], path-b_vit-ti needs [576, 192])" in message

    with pytest.raises(CheckpointError, match="trained as recipe 'path-b_vit-ti', not 'path-l_vit-ti'"):
        load_original_checkpoint(path, "path-l_vit-ti")
    with pytest.raises(CheckpointError, match="Swin student"):
        load_original_checkpoint(path, "solider-b_swin-t")
    # Checks that come before the keys: a small container is enough.
    small = {"module.backbone.cls_token": torch.zeros(1, 1, 192)}
    for name, args, match in [("swin", "DPAL_kd_swin_tiny_patch16_moe", "is a Swin student"),
                              ("unknown", "mystery", "pass the recipe explicitly")]:
        torch.save({"student": small, "args": argparse.Namespace(model=args)}, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match=match):
            load_original_checkpoint(tmp_path / f"{name}.pth")
    torch.save({"student": small}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match="no 'teacher' dict of tensors"):
        load_original_checkpoint(tmp_path / "no_ema.pth", "path-b_vit-ti", weights="ema")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="expected layout: original DPAL"):
        load_original_checkpoint(garbage)
