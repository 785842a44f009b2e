"""Teachers: checkpoints written in every released layout by independent reference modules load exactly.

The references below are written from the published descriptions, not from timm: a plain ViT (PATH) and an
mmdet-style Swin with SOLIDER's semantic-weight modulation and nn.Unfold patch merging. Small widths and depths
keep the tests fast; the production code paths are the same (the spec's width/depth/heads define the model).
"""
from __future__ import annotations

import argparse
import math
import os
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from dpal.checkpoints import CheckpointError, load_checkpoint_file
from dpal.config import TeacherSpec
from helpers import RefAttention
from dpal.teachers import (Teacher, build_teacher, interpolate_pos_encoding, load_teacher, release_checkpoint,
                           teacher_targets)

SMALL_VIT = TeacherSpec("path-small", "vit", "vit_base_patch16_224", width=64, depth=2, num_heads=4,
                        patch_size=16, token_stride=16, has_cls=True)
SMALL_SWIN = TeacherSpec("solider-small", "swin", "swin_base_patch4_window7_224", width=64, depth=8, num_heads=8,
                         patch_size=4, token_stride=32, has_cls=False)
VIEW_SIZES = [(256, 128), (256, 256)]


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random values everywhere (norm weights too), so a mis-mapped or mis-permuted tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)
    return module


def images(size, batch=2, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- reference ViT (PATH)



class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), RefAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), RefMlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefViT(nn.Module):
    """ViT/16 with CLS and a learned position grid resized to the input's patch grid as the original did
    (DINO's interpolate_pos_encoding, spec 1): bicubic by scale factor (grid + 0.1) / stored grid, no antialias."""

    def __init__(self, dim, depth, heads, grid):
        super().__init__()
        self.grid = grid
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList(RefViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x)
        b, d, h, w = x.shape
        grid_pos = self.pos_embed[:, 1:].reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, scale_factor=((h + 0.1) / self.grid, (w + 0.1) / self.grid),
                                 mode="bicubic", align_corners=False)
        assert grid_pos.shape[-2:] == (h, w)
        pos = torch.cat([self.pos_embed[:, :1], grid_pos.flatten(2).transpose(1, 2)], dim=1)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def ref_vit(spec=SMALL_VIT, grid=14, seed=1):
    return randomize_(RefViT(spec.width, spec.depth, spec.num_heads, grid), seed).eval()


def multitask_layout(ref: RefViT, *, with_cls_position=True) -> dict:
    raw = {}
    for key, value in ref.state_dict().items():
        if key == "pos_embed":
            if with_cls_position:
                raw["module.backbone_module.cls_token_pos_embed"] = value[:, :1]
            value = value[:, 1:]
        raw["module.backbone_module." + key] = value
    raw["module.neck_module.proj.weight"] = torch.zeros(3, 3)  # other task modules live beside the backbone
    return {"state_dict": raw, "epoch": 7}


# -------------------------------------------------------------------------- reference mmdet Swin (SOLIDER)

class RefWindowMSA(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        # mmdet builds the index as a "double step" sequence added to its transpose, columns flipped.
        steps = (torch.arange(window)[:, None] * (2 * window - 1) + torch.arange(window)[None, :]).reshape(1, -1)
        self.register_buffer("relative_position_index", (steps + steps.T).flip(1).contiguous())
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1)[None]
        if mask is not None:
            attn = (attn.view(b // mask.shape[0], mask.shape[0], self.heads, n, n) + mask[None, :, None]).view(
                b, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


def partition(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def unpartition(windows, ws, b, h, w):
    return windows.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


class RefShiftWindowMSA(nn.Module):
    """mmdet: pad to window multiples, then roll; the region mask is built on the padded canvas."""

    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.window, self.shift = window, shift
        self.w_msa = RefWindowMSA(dim, heads, window)

    def forward(self, x, hw):
        (h, w), (b, _, c), ws, s = hw, x.shape, self.window, self.shift
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, (-w) % ws, 0, (-h) % ws))
        hp, wp = x.shape[1:3]
        mask = None
        if s:
            x = torch.roll(x, (-s, -s), (1, 2))
            # regions [0, Hp-ws), [Hp-ws, Hp-s), [Hp-s, Hp) per axis: tokens of different regions must not attend
            rows = torch.bucketize(torch.arange(hp), torch.tensor([hp - ws, hp - s]), right=True)
            cols = torch.bucketize(torch.arange(wp), torch.tensor([wp - ws, wp - s]), right=True)
            region = (rows[:, None] * 3 + cols[None, :]).float()[None, :, :, None]
            ids = partition(region, ws).squeeze(-1)
            mask = torch.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0)
        x = unpartition(self.w_msa(partition(x, ws), mask), ws, b, hp, wp)
        if s:
            x = torch.roll(x, (s, s), (1, 2))
        return x[:, :h, :w].reshape(b, h * w, c)


class RefSwinBlock(nn.Module):
    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), RefShiftWindowMSA(dim, heads, window, shift)
        self.norm2, self.ffn = nn.LayerNorm(dim), nn.Module()
        self.ffn.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU()), nn.Linear(4 * dim, dim))

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)
        return x + self.ffn.layers(self.norm2(x))


class RefPatchMerging(nn.Module):
    """mmdet's merging: nn.Unfold(2, stride 2) gives channels in (c, kh, kw) order."""

    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, hw):
        (h, w), (b, _, c) = hw, x.shape
        x = F.unfold(x.transpose(1, 2).reshape(b, c, h, w), kernel_size=2, stride=2).transpose(1, 2)
        return self.reduction(self.norm(x)), (h // 2, w // 2)


class RefStage(nn.Module):
    def __init__(self, dim, depth, heads, window, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(RefSwinBlock(dim, heads, window, window // 2 if j % 2 else 0)
                                    for j in range(depth))
        self.downsample = RefPatchMerging(dim) if downsample else None


class RefSoliderSwin(nn.Module):
    """SOLIDER's Swin: after each stage x <- x * softplus(W_w [s,1-s] + b_w) + (W_b [s,1-s] + b_b)."""

    def __init__(self, embed=8, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window=7):
        super().__init__()
        widths = [embed * 2 ** i for i in range(len(depths))]
        self.patch_embed = nn.Module()
        self.patch_embed.projection, self.patch_embed.norm = nn.Conv2d(3, embed, 4, 4), nn.LayerNorm(embed)
        self.stages = nn.ModuleList(RefStage(widths[i], depths[i], heads[i], window, i < len(depths) - 1)
                                    for i in range(len(depths)))
        for i, width in enumerate(widths):
            self.add_module(f"norm{i}", nn.LayerNorm(width))
        modulated = [widths[min(i + 1, len(widths) - 1)] for i in range(len(depths))]
        self.semantic_embed_w = nn.ModuleList(nn.Linear(2, c) for c in modulated)
        self.semantic_embed_b = nn.ModuleList(nn.Linear(2, c) for c in modulated)

    def forward(self, images, s):
        x = self.patch_embed.projection(images)
        hw = tuple(x.shape[2:])
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        condition = torch.tensor([[s, 1.0 - s]]).expand(x.shape[0], 2)
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                x = block(x, hw)
            out, out_hw = x, hw
            if stage.downsample is not None:
                x, hw = stage.downsample(x, hw)
            scale, shift = F.softplus(self.semantic_embed_w[i](condition)), self.semantic_embed_b[i](condition)
            x = x * scale[:, None] + shift[:, None]
        return getattr(self, f"norm{len(self.stages) - 1}")(out), out_hw


def ref_swin(seed=2):
    ref = randomize_(RefSoliderSwin(), seed).eval()
    with torch.no_grad():  # semantic layers strong enough that folding the wrong s (or none) shows
        for layer in [*ref.semantic_embed_w, *ref.semantic_embed_b]:
            layer.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed + 10))
    return ref


def solider_layout(teacher_ref, student_ref) -> dict:
    dino_head = {"head.mlp.0.weight": torch.zeros(4, 4), "head.last_layer.weight_g": torch.ones(4, 1)}
    return {
        "teacher": {**{"backbone." + k: v for k, v in teacher_ref.state_dict().items()}, **dino_head},
        "student": {**{"module.backbone." + k: v for k, v in student_ref.state_dict().items()},
                    **{"module." + k: v for k, v in dino_head.items()}},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="swin_base", semantic_weight=0.2, lr=5e-4),
    }


def assert_tokens_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------------------------- PATH tests

@pytest.mark.parametrize("layout", ["model", "multitask", "multitask_no_cls_position"])
def test_path_layouts_load_to_reference(tmp_path, layout):
    ref = ref_vit()
    if layout == "model":
        checkpoint = {"model": ref.state_dict()}
    else:
        with_cls = layout == "multitask"
        if not with_cls:
            with torch.no_grad():
                ref.pos_embed[:, :1].zero_()  # "zeros if absent"
        checkpoint = multitask_layout(ref, with_cls_position=with_cls)
    torch.save(checkpoint, tmp_path / "path.pth")
    teacher = load_teacher(SMALL_VIT, tmp_path / "path.pth")
    for size in VIEW_SIZES:
        x = images(size)
        out = teacher(x)
        assert out.grid == (size[0] // 16, size[1] // 16)
        assert out.tokens.shape == (2, 1 + out.grid[0] * out.grid[1], SMALL_VIT.width)
        with torch.no_grad():
            assert_tokens_close(out.tokens, ref(x))


@pytest.mark.parametrize("stored", [14, 30])
def test_position_grid_resize_is_dinos_interpolate_pos_encoding(stored):
    """Spec 1: bicubic by scale factor (grid + 0.1) / stored, no antialias, CLS position kept; unchanged at
    the stored grid (DINO returns it as is). timm's antialiased resize to the exact size differs."""
    pos_embed = torch.randn(1, 1 + stored * stored, 24, generator=torch.Generator().manual_seed(stored),
                            dtype=torch.float64)
    grid_part = pos_embed[:, 1:].reshape(1, stored, stored, 24).permute(0, 3, 1, 2)
    for h, w in [(16, 8), (16, 16), (8, 6), (2 * stored, stored + 3)]:
        got = interpolate_pos_encoding(pos_embed, (h, w))
        expected = F.interpolate(grid_part, scale_factor=((h + 0.1) / stored, (w + 0.1) / stored), mode="bicubic",
                                 align_corners=False)
        assert got.shape == (1, 1 + h * w, 24) and torch.equal(got[:, :1], pos_embed[:, :1])
        torch.testing.assert_close(got[:, 1:], expected.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)
        exact_size = F.interpolate(grid_part, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        assert (got[:, 1:] - exact_size.flatten(2).transpose(1, 2)).abs().max() > 1e-2
    assert interpolate_pos_encoding(pos_embed, (stored, stored)) is pos_embed


def test_path_l_multitask_at_480_resizes_30x30_grid(tmp_path):
    ref = ref_vit(grid=30, seed=3)
    torch.save(multitask_layout(ref), tmp_path / "path_l.pth")
    teacher = load_teacher(SMALL_VIT, tmp_path / "path_l.pth")
    assert teacher.model.pos_embed.shape == (1, 901, SMALL_VIT.width)
    for size in VIEW_SIZES:
        x = images(size)
        with torch.no_grad():
            assert_tokens_close(teacher(x).tokens, ref(x))


def test_path_release_is_multitask_layout_and_round_trips(tmp_path):
    teacher = build_teacher(SMALL_VIT)
    released = release_checkpoint(teacher)
    keys = released["state_dict"]
    assert keys["module.backbone_module.pos_embed"].shape == (1, 196, SMALL_VIT.width)
    assert keys["module.backbone_module.cls_token_pos_embed"].shape == (1, 1, SMALL_VIT.width)
    ref = ref_vit()
    ref.load_state_dict({k.removeprefix("module.backbone_module."): v for k, v in keys.items()
                         if k != "module.backbone_module.cls_token_pos_embed"}
                        | {"pos_embed": teacher.model.pos_embed.detach()})
    torch.save(released, tmp_path / "released.pth")
    reloaded = load_teacher(SMALL_VIT, tmp_path / "released.pth")
    x = images((256, 256))
    with torch.no_grad():
        assert_tokens_close(reloaded(x).tokens, teacher(x).tokens)
        assert_tokens_close(reloaded(x).tokens, ref(x))


def test_full_size_path_b_round_trip(tmp_path):
    teacher = build_teacher("path-b")
    assert teacher.model.pos_embed.shape == (1, 197, 768) and len(teacher.model.blocks) == 12
    assert teacher.model.blocks[0].attn.num_heads == 12 and teacher.model.norm.eps == 1e-6
    torch.save({"model": teacher.model.state_dict()}, tmp_path / "path_b.pth")
    reloaded = load_teacher("path-b", tmp_path / "path_b.pth")
    x = images((256, 128), batch=1)
    with torch.no_grad():
        out = reloaded(x)
        assert out.tokens.shape == (1, 129, 768) and out.grid == (16, 8)
        torch.testing.assert_close(out.tokens, teacher(x).tokens, rtol=0, atol=0)


def test_full_size_solider_b_is_swin_b():
    with torch.device("meta"):  # shapes only: the small Swin above runs the same code at full numerical depth
        teacher = build_teacher("solider-b")
        stock = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0)
    ours = {k: v.shape for k, v in teacher.model.state_dict().items()}
    expected = {k: v.shape for k, v in stock.state_dict().items()}
    folded_biases = {f"layers.{i}.downsample.reduction.bias": torch.Size([128 * 2 ** i]) for i in (1, 2, 3)}
    assert ours == expected | folded_biases
    assert [len(stage.blocks) for stage in teacher.model.layers] == [2, 2, 18, 2]
    assert all(block.window_size == (7, 7) for stage in teacher.model.layers for block in stage.blocks)


# -------------------------------------------------------------------------------------------- SOLIDER tests

@pytest.mark.parametrize("container,semantic_weight", [("teacher", 0.0), ("teacher", 0.6), ("student", 1.0)])
def test_solider_layout_loads_to_reference(tmp_path, container, semantic_weight):
    refs = {"teacher": ref_swin(seed=2), "student": ref_swin(seed=5)}
    torch.save(solider_layout(refs["teacher"], refs["student"]), tmp_path / "solider.pth")
    teacher = load_teacher(SMALL_SWIN, tmp_path / "solider.pth", solider_weights=container,
                           semantic_weight=semantic_weight)
    assert teacher.semantic_weight == semantic_weight
    for size in VIEW_SIZES:
        x = images(size, seed=4)
        out = teacher(x)
        with torch.no_grad():
            expected, expected_hw = refs[container](x, semantic_weight)
        assert out.grid == expected_hw == (size[0] // 32, size[1] // 32)
        assert_tokens_close(out.tokens, expected)


def test_solider_semantic_weight_changes_the_teacher(tmp_path):
    torch.save(solider_layout(ref_swin(), ref_swin(seed=5)), tmp_path / "solider.pth")
    x = images((256, 128))
    low = load_teacher(SMALL_SWIN, tmp_path / "solider.pth", semantic_weight=0.0)(x).tokens
    high = load_teacher(SMALL_SWIN, tmp_path / "solider.pth", semantic_weight=1.0)(x).tokens
    assert (low - high).abs().max() > 1e-2


def test_solider_release_is_mmdet_layout_and_round_trips(tmp_path):
    teacher = build_teacher(SMALL_SWIN, semantic_weight=0.3)
    with torch.no_grad():  # a non-trivial folded affine, as a loaded SOLIDER teacher has
        for i in (1, 2, 3):
            teacher.model.layers[i].downsample.reduction.bias.normal_(0, 0.5)
    released = release_checkpoint(teacher)
    assert isinstance(released["args"], argparse.Namespace)
    ref = RefSoliderSwin()
    ref.load_state_dict({k.removeprefix("backbone."): v for k, v in released["teacher"].items()})
    torch.save(released, tmp_path / "released.pth")
    x = images((256, 256), seed=6)
    expected = teacher(x).tokens
    for s in (0.0, 0.7):  # the release does not depend on s
        with torch.no_grad():
            assert_tokens_close(ref(x, s)[0], expected)
        for container in ("teacher", "student"):
            reloaded = load_teacher(SMALL_SWIN, tmp_path / "released.pth", solider_weights=container,
                                    semantic_weight=s)
            assert_tokens_close(reloaded(x).tokens, expected)


# -------------------------------------------------------------------------------------------------- targets

@pytest.mark.parametrize("spec", [SMALL_VIT, SMALL_SWIN], ids=["vit", "swin"])
def test_teacher_targets(spec):
    teacher = build_teacher(spec)
    global_views, crowd_views = images((256, 128), seed=7), images((256, 256), seed=8)
    targets = teacher_targets(teacher, global_views, crowd_views)
    tokens, crowd = teacher(global_views).tokens, teacher(crowd_views).tokens
    if spec.has_cls:
        assert_tokens_close(targets.global_, tokens[:, 0])
        assert_tokens_close(targets.local, tokens[:, 1:])
        assert targets.relation.shape == (2, 257, 257)
    else:
        assert_tokens_close(targets.global_, tokens.mean(1))
        assert_tokens_close(targets.local, tokens)
        assert targets.relation.shape == (2, 64, 64)
    f = crowd.double()
    expected = torch.softmax(f @ f.transpose(1, 2) / math.sqrt(spec.width), dim=-1)
    assert targets.relation.dtype == torch.float32
    torch.testing.assert_close(targets.relation.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(targets.relation.sum(-1), torch.ones(2, expected.shape[1]))


@pytest.mark.parametrize("spec", [SMALL_VIT, SMALL_SWIN], ids=["vit", "swin"])
def test_teacher_relation_logits_are_float32_under_bf16_autocast(spec):
    """Spec 6: R_t under the caching / online teacher's bf16 autocast = softmax of float32 F F^T of the tokens
    that autocast run gives, not of logits rounded to bf16."""
    teacher = randomize_(build_teacher(spec), seed=11)
    global_views, crowd_views = images((256, 128), seed=12), images((256, 256), seed=13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        targets = teacher_targets(teacher, global_views, crowd_views)
        crowd = teacher(crowd_views).tokens
    f = crowd.double()
    expected = torch.softmax(f @ f.transpose(1, 2) / math.sqrt(spec.width), dim=-1)
    assert targets.relation.dtype == torch.float32
    torch.testing.assert_close(targets.relation.double(), expected, rtol=1e-5, atol=1e-7)


def test_teacher_is_frozen_and_stays_in_eval():
    teacher = build_teacher(SMALL_VIT)
    teacher.train()
    assert isinstance(teacher, Teacher) and not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="multiples of 16"):
        teacher(torch.randn(1, 3, 250, 128))


# ------------------------------------------------------------------------------------------------ bad input

def write(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def assert_names(error: CheckpointError, path, *fragments):
    message = str(error.value)
    assert str(path) in message and "expected layout" in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_unknown_layout(tmp_path):
    path = write(tmp_path, "weird.pth", {"weights": {"a": torch.zeros(1)}})
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_VIT, path)
    assert_names(error, path, "'model'", "'state_dict'", "'weights'")
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_SWIN, path)
    assert_names(error, path, "'teacher'", "SOLIDER")


def test_layout_of_the_other_teacher(tmp_path):
    path_file = write(tmp_path, "path.pth", {"model": ref_vit().state_dict()})
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_SWIN, path_file)
    assert_names(error, path_file, "SOLIDER", "'model'")
    solider_file = write(tmp_path, "solider.pth", solider_layout(ref_swin(), ref_swin()))
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_VIT, solider_file)
    assert_names(error, solider_file, "PATH", "'teacher'")


def test_wrong_width(tmp_path):
    wide = TeacherSpec(**{**SMALL_VIT.__dict__, "width": 96})
    path = write(tmp_path, "wide.pth", {"model": ref_vit(spec=wide).state_dict()})
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_VIT, path)
    assert_names(error, path, "wrong shapes", "cls_token (file [1, 1, 96], path-small needs [1, 1, 64])")
    wide_swin = randomize_(RefSoliderSwin(embed=16), seed=3)
    path = write(tmp_path, "wide_swin.pth", solider_layout(wide_swin, wide_swin))
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_SWIN, path)
    assert_names(error, path, "wrong shapes", "patch_embed.proj.weight (file [16, 3, 4, 4]")


def test_wrong_depth(tmp_path):
    deep = TeacherSpec(**{**SMALL_VIT.__dict__, "depth": 3})
    path = write(tmp_path, "deep.pth", {"model": ref_vit(spec=deep).state_dict()})
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_VIT, path)
    assert_names(error, path, "unexpected keys", "blocks.2.attn.qkv.weight")
    assert not error.value.missing and "blocks.2.mlp.fc1.bias" in error.value.unexpected
    shallow = TeacherSpec(**{**SMALL_VIT.__dict__, "depth": 1})
    path = write(tmp_path, "shallow.pth", multitask_layout(ref_vit(spec=shallow)))
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_VIT, path)
    assert_names(error, path, "missing keys", "blocks.1.norm1.weight", "multitask")


def test_solider_missing_and_unexpected_keys(tmp_path):
    checkpoint = solider_layout(ref_swin(), ref_swin())
    del checkpoint["teacher"]["backbone.stages.1.blocks.0.ffn.layers.1.weight"]
    checkpoint["teacher"]["backbone.absolute_pos_embed"] = torch.zeros(1, 4, 8)
    path = write(tmp_path, "broken.pth", checkpoint)
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_SWIN, path)
    assert_names(error, path, "layers.1.blocks.0.mlp.fc2.weight", "absolute_pos_embed", "'teacher'")
    assert error.value.missing == ["layers.1.blocks.0.mlp.fc2.weight"]
    assert error.value.unexpected == ["absolute_pos_embed"]

    checkpoint = solider_layout(ref_swin(), ref_swin())
    del checkpoint["teacher"]["backbone.semantic_embed_b.1.bias"]
    path = write(tmp_path, "no_semantic.pth", checkpoint)
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_SWIN, path)
    assert_names(error, path, "semantic_embed_b.1.bias")

    del checkpoint["student"]
    path = write(tmp_path, "no_student.pth", checkpoint)
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_SWIN, path, solider_weights="student")
    assert_names(error, path, "no 'student'", "'teacher'")


def test_semantic_weight_outside_unit_interval(tmp_path):
    path = write(tmp_path, "solider.pth", solider_layout(ref_swin(), ref_swin()))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_teacher(SMALL_SWIN, path, semantic_weight=-1.0)
    with pytest.raises(ValueError, match="'teacher' or 'student'"):
        load_teacher(SMALL_SWIN, path, solider_weights="ema")


def test_truncated_file(tmp_path):
    path = write(tmp_path, "full.pth", {"model": ref_vit().state_dict()})
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        load_teacher(SMALL_VIT, truncated)
    assert_names(error, truncated, "not a readable PyTorch checkpoint")


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", bytes(range(256)) * 40])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "image.jpg"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(path)
    assert_names(error, path, "not a readable PyTorch checkpoint")


def test_missing_file_and_non_dict(tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_teacher("path-b", tmp_path / "absent.pth")
    assert_names(error, tmp_path / "absent.pth", "does not exist")
    path = write(tmp_path, "tensor.pth", torch.zeros(3))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(path)
    assert_names(error, path, "not a dict")


class Payload:
    """Stands for any pickled object a checkpoint should never get to construct."""


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    path = write(tmp_path, "payload.pth", {"model": {"w": torch.zeros(1)}, "extra": Payload()})
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(path)
    assert_names(error, path, "Payload", "only tensors")
    allowed = write(tmp_path, "namespace.pth", {"args": argparse.Namespace(lr=0.1), "epoch": 1})
    assert load_checkpoint_file(allowed)["args"].lr == 0.1


class SystemCall:
    def __reduce__(self):  # what a malicious checkpoint holds: a call run while unpickling
        return os.system, ("echo should never run",)


class Evaluation:
    def __reduce__(self):
        return eval, ("1 + 1",)


@pytest.mark.parametrize("how, payload, named", [("torch.save", SystemCall(), "posix.system"),
                                                 ("torch.save", Evaluation(), "eval"),
                                                 ("pickle.dump", SystemCall(), "pickle instruction 149 refused")])
def test_malicious_checkpoint_gets_a_truthful_refusal(tmp_path, how, payload, named):
    path = tmp_path / "malicious.pth"
    if how == "torch.save":
        torch.save({"model": {"w": torch.zeros(1)}, "extra": payload}, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump({"model": payload}, handle)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(path)
    assert_names(error, path, named, "NOT loaded")
    assert "weights_only" not in str(error.value)
    assert ("not allowed" in str(error.value)) == (how == "torch.save")  # a global named: refused as not allowed


def test_teacher_options_apply_to_solider_only_and_are_validated():
    from dpal.teachers import teacher_options

    assert teacher_options("path-b") == {}
    assert teacher_options("solider-b") == {"solider_weights": "teacher", "semantic_weight": 0.0}
    assert teacher_options("solider-b", solider_weights="student", semantic_weight=0.6) == {
        "solider_weights": "student", "semantic_weight": 0.6}
    with pytest.raises(ValueError, match="SOLIDER teachers only, not path-l"):
        teacher_options("path-l", semantic_weight=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        teacher_options("solider-b", semantic_weight=1.5)
    with pytest.raises(ValueError, match="solider_weights must be one of"):
        teacher_options("solider-b", solider_weights="ema")
