"""Students: head counts, init, 2-D position resizing, grid-adaptive Swin windows, token selection for
each teacher kind, and exports: timm local-dir folders that only dpal's registered architectures load, their
weights checksum, and their torch.export program."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.swin_transformer import SwinTransformerBlock

from dpal.checkpoints import CheckpointError
from dpal.recipes import RECIPES, get_recipe
from dpal.students import (
    _GridWindowSwinBlock,
    build_student,
    load_student,
    read_student_config,
)
from formats.exports import PROGRAM_FILE, export_student

VIEW_SIZES = [(256, 128), (128, 96), (256, 256)]


@pytest.fixture(scope="module")
def vit_ti():
    torch.manual_seed(0)
    return build_student(get_recipe("path-b_vit-ti")).eval()


@pytest.fixture(scope="module")
def swin_t():
    torch.manual_seed(1)
    return build_student(get_recipe("path-b_swin-t")).eval()


def test_vit_init_is_the_originals(vit_ti):
    """The original's init: xavier-uniform linears with zero bias, CLS N(0, 0.02), pos_embed U[0, 1),
    patch-projection bias at PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    backbone = vit_ti.backbone
    for linear in [backbone.blocks[3].attn.qkv, backbone.blocks[-1].attn.qkv, backbone.blocks[5].mlp.fc2]:
        bound = math.sqrt(6.0 / (linear.in_features + linear.out_features))
        assert linear.weight.abs().max() <= bound
        assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert torch.count_nonzero(linear.bias) == 0
    assert backbone.cls_token.std().item() == pytest.approx(0.02, rel=0.5)
    pos = backbone.pos_embed
    assert pos.shape == (1, 129, 192) and pos.min() >= 0 and pos.max() < 1
    assert pos.mean().item() == pytest.approx(0.5, abs=0.01) and pos.std().item() == pytest.approx(
        math.sqrt(1 / 12), rel=0.02)
    proj = backbone.patch_embed.proj
    bound = 1 / math.sqrt(proj.weight[0].numel())
    assert proj.bias.abs().max() <= bound and proj.bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)
    xavier = math.sqrt(6.0 / (proj.weight[0].numel() + proj.out_channels))
    assert proj.weight.abs().max() <= xavier and proj.weight.std().item() == pytest.approx(xavier / math.sqrt(3),
                                                                                          rel=0.05)


def test_vit_position_grid_resized_2d_bicubic(vit_ti):
    backbone = copy.deepcopy(vit_ti.backbone)
    dim = backbone.embed_dim
    with torch.no_grad():
        # A position embedding that varies only along rows: a 2-D resize keeps every row constant, a 1-D
        # resize of the flattened 16*8 sequence (the original code) would mix neighbouring rows.
        rows = torch.randn(16, 1, dim).expand(16, 8, dim)
        backbone.pos_embed[0, 1:] = rows.reshape(128, dim)
        backbone.cls_token.zero_()
    for grid in [(8, 6), (16, 16), (16, 8)]:
        zeros = torch.zeros(1, *grid, dim)
        resized = backbone._pos_embed(zeros)[0, 1:].reshape(*grid, dim)
        expected = F.interpolate(rows.permute(2, 0, 1)[None], size=grid, mode="bicubic", antialias=True)
        torch.testing.assert_close(resized, expected[0].permute(1, 2, 0), rtol=1e-5, atol=1e-6)
        assert torch.allclose(resized, resized[:, :1].expand_as(resized), atol=1e-6)
        assert torch.equal(backbone._pos_embed(zeros)[0, 0], backbone.pos_embed[0, 0])  # CLS position kept


def _reference_window_attention(block: _GridWindowSwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention written per token: a token attends to the real tokens of its window.

    Along an axis longer than the window, windows start at the shift offset (partial windows at both ends);
    along an axis that fits into one window there is one window. Relative-position bias from the 13x13 table."""
    batch, height, width, channels = x.shape
    win = block.window_size[0]
    heads = block.attn.num_heads

    def groups(size: int, shift: int) -> torch.Tensor:
        r = torch.arange(size)
        if size <= win:
            return torch.zeros(size, dtype=torch.long)
        return (r + win - shift) // win if shift else r // win

    gh, gw = groups(height, block.shift_size[0]), groups(width, block.shift_size[1])
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs, gh, gw = ys.flatten(), xs.flatten(), gh[ys.flatten()], gw[xs.flatten()]
    allowed = (gh[:, None] == gh[None, :]) & (gw[:, None] == gw[None, :])
    table = block.attn.relative_position_bias_table  # [(2*win-1)^2, heads]
    index = (ys[:, None] - ys[None, :] + win - 1) * (2 * win - 1) + (xs[:, None] - xs[None, :] + win - 1)
    bias = table[index.where(allowed, 0)].permute(2, 0, 1)  # heads, N, N (pairs in different windows: masked)
    tokens = x.reshape(batch, height * width, channels).double()
    qkv = F.linear(tokens, block.attn.qkv.weight.double(), block.attn.qkv.bias.double())
    q, k, v = qkv.reshape(batch, -1, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(channels // heads) + bias.double()
    attention = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = (attention @ v).transpose(1, 2).reshape(batch, height * width, channels)
    out = F.linear(out, block.attn.proj.weight.double(), block.attn.proj.bias.double())
    return out.reshape(batch, height, width, channels)


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("grid", [(4, 3), (8, 4), (8, 8), (16, 8), (10, 15)])
def test_swin_windows_adapt_to_grid(grid, shift):
    torch.manual_seed(2)
    block = SwinTransformerBlock(32, input_resolution=(64, 32), num_heads=2, window_size=7, shift_size=shift,
                                 always_partition=True, dynamic_mask=True)
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(std=0.5)
    block = _GridWindowSwinBlock(block)
    x = torch.randn(2, *grid, 32)
    torch.testing.assert_close(block.window_attention(x).double(), _reference_window_attention(block, x), rtol=1e-4,
                               atol=1e-5)


def test_swin_outputs_for_every_view_size(swin_t):
    assert [b.attn.num_heads for b in swin_t.backbone.layers[-1].blocks] == [24, 24]
    assert isinstance(swin_t.backbone.layers[0].blocks[0].drop_path1, torch.nn.Identity)  # rate 0 at the start
    assert swin_t.backbone.layers[-1].blocks[-1].drop_path2.drop_prob == pytest.approx(0.1)  # timm's linear rule
    torch.manual_seed(3)
    for height, width in VIEW_SIZES:
        batch = 2 if (height, width) == (128, 96) else 1
        images = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            out = swin_t(images)
        grid = (height // 32, width // 32)
        assert out.grid == grid and out.patches.shape == (batch, grid[0] * grid[1], 768)
        torch.testing.assert_close(out.cls, out.patches.mean(dim=1, keepdim=True))
        if batch == 2:  # the most padded grids: nothing leaks between batch-mates
            with torch.no_grad():
                alone = swin_t(images[1:])
            torch.testing.assert_close(alone.patches, out.patches[1:], rtol=1e-4, atol=1e-4)


def test_tokens_for_each_teacher_kind(vit_ti, swin_t):
    path_b, solider = get_recipe("path-b_vit-ti").teacher, get_recipe("solider-b_swin-t").teacher
    torch.manual_seed(4)
    crowd, global_view = torch.randn(1, 3, 256, 256), torch.randn(1, 3, 256, 128)
    with torch.no_grad():
        vit_crowd, swin_crowd, swin_global = vit_ti(crowd), swin_t(crowd), swin_t(global_view)
    # ViT student, ViT teacher: [CLS, 256 patches]; local = the patch tokens themselves.
    relation = vit_ti.relation_tokens(vit_crowd, path_b)
    assert relation.shape == (1, 257, 192) and torch.equal(relation[:, 0], vit_crowd.cls[:, 0])
    assert vit_ti.local_tokens(vit_crowd, path_b) is vit_crowd.patches
    # Swin student, ViT teacher: final 8x4 tokens upsampled 2x bicubic to the 16x8 grid, mean in the CLS slot.
    local = swin_t.local_tokens(swin_global, path_b)
    grid = swin_global.patches.reshape(1, 8, 4, 768).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=2, mode="bicubic").flatten(2).transpose(1, 2)
    torch.testing.assert_close(local, expected)
    relation = swin_t.relation_tokens(swin_crowd, path_b)
    assert relation.shape == (1, 257, 768)
    torch.testing.assert_close(relation[:, :1], swin_crowd.patches.mean(dim=1, keepdim=True))
    # Swin student, Swin teacher: the 8x8 final tokens on both sides, no CLS slot.
    assert swin_t.relation_tokens(swin_crowd, solider).shape == (1, 64, 768)
    assert swin_t.local_tokens(swin_global, solider).shape == (1, 32, 768)


def test_every_recipe_architecture_and_token_shapes():
    """Every recipe's student on every view size, on the meta device (architecture and shapes, no compute)."""
    for recipe in RECIPES.values():
        with torch.device("meta"):
            student = build_student(recipe)
            global_out, local_out, crowd_out = (student(torch.empty(2, 3, h, w)) for h, w in VIEW_SIZES)
            # ViT: at the training size (position grid 16x8). Swin: timm's own 224 model (7x7 windows everywhere).
            size = {"img_size": (256, 128)} if recipe.student.arch == "vit" else {}
            stock = timm.create_model(recipe.student.timm_name, pretrained=False, num_classes=0, **size)
        backbone, teacher, width = student.backbone, recipe.teacher, recipe.student.width
        # The state dict is timm's: a stock model of the same family has the same keys and shapes.
        assert {k: v.shape for k, v in stock.state_dict().items()} == \
            {k: v.shape for k, v in backbone.state_dict().items()}, recipe.name
        if recipe.student.arch == "vit":
            heads = [block.attn.num_heads for block in backbone.blocks]
            assert heads == [recipe.student.num_heads] * 11 + [teacher.num_heads], recipe.name
            assert all(isinstance(block.drop_path1, torch.nn.Identity) for block in backbone.blocks)  # rate 0
        grid = (256 // teacher.token_stride, 128 // teacher.token_stride)
        crowd_tokens = (256 // teacher.token_stride) ** 2 + teacher.has_cls
        assert student.local_tokens(global_out, teacher).shape == (2, grid[0] * grid[1], width), recipe.name
        assert student.relation_tokens(crowd_out, teacher).shape == (2, crowd_tokens, width), recipe.name
        assert local_out.cls.shape == (2, 1, width) and global_out.patches.shape[-1] == recipe.decoder.student_dim


def _moved(student, scale, shift):
    """A copy with every parameter moved (stands for training or the EMA average)."""
    moved = copy.deepcopy(student)
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(scale).add_(shift)
    return moved


def test_vit_export_round_trip_carries_architecture(vit_ti, tmp_path):
    torch.manual_seed(5)
    trained, ema = _moved(vit_ti, 0.9, 0.01), _moved(vit_ti, 1.1, -0.01)
    folder = export_student(trained, tmp_path / "student", extra={"recipe": "path-b_vit-ti"}, program=False)
    export_student(ema, tmp_path / "student_ema", program=False)
    timm_config = json.loads((folder / "config.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert timm_config["architecture"] == "dpal_vit_ti" and timm_config["model_args"]["last_block_heads"] == 12
    config = timm_config["dpal"]
    assert config["timm_name"] == "vit_tiny_patch16_224" and config["timm_kwargs"]["num_heads"] == 6
    assert config["last_block_heads"] == 12 and config["timm_kwargs"]["img_size"] == [256, 128]
    assert config["extra"] == {"recipe": "path-b_vit-ti"} and len(config["weights_sha256"]) == 64

    images = torch.randn(2, 3, 256, 128)
    for source, name in [(trained, "student"), (ema, "student_ema/config.json")]:
        model = load_student(tmp_path / name)
        assert [b.attn.num_heads for b in model.blocks] == [6] * 11 + [12] and not model.training
        assert model.pretrained_cfg["input_size"] == [3, 256, 128]
        with torch.no_grad():
            expected = source.backbone.forward_features(images)
            torch.testing.assert_close(model.forward_features(images), expected, rtol=0, atol=0)
            torch.testing.assert_close(model(images), expected[:, 0], rtol=0, atol=0)  # timm's CLS pooling
            crop = torch.randn(1, 3, 128, 96)  # other grids resize the 16x8 positions the same way
            torch.testing.assert_close(model.forward_features(crop), source.backbone.forward_features(crop))

    # Why the export must not be a stock timm name: a stock ViT-Ti (3 heads) loads the same keys strictly and
    # computes something else.
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=(256, 128)).eval()
    stock.load_state_dict(trained.backbone.state_dict(), strict=True)
    with torch.no_grad():
        assert not torch.allclose(stock.forward_features(images), trained.backbone.forward_features(images), atol=1e-3)


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", ["path-b_vit-ti", "solider-b_swin-t"])
def test_timm_local_dir_gives_the_trained_features_and_the_program_equals_eager(recipe, tmp_path):
    """timm.create_model('local-dir:FOLDER') with dpal imported: exactly the trained features (at the sizes the
    recipe trains at); the export's torch.export program, loaded with torch alone, equals eager at any batch."""
    import dpal  # noqa: F401  (registers the students with timm)

    torch.manual_seed(7)
    student = _moved(build_student(get_recipe(recipe)).eval(), 1.05, 0.002)
    folder = export_student(student, tmp_path / "student_ema")
    model = timm.create_model(f"local-dir:{folder}")
    assert not model.training
    program = torch.export.load(str(folder / PROGRAM_FILE)).module()
    with torch.no_grad():
        for size in VIEW_SIZES:
            images = torch.randn(2, 3, *size)
            torch.testing.assert_close(model.forward_features(images), student.backbone.forward_features(images),
                                       rtol=0, atol=0)
        for batch in (1, 3):
            images = torch.randn(batch, 3, 256, 128)
            torch.testing.assert_close(program(images), student.backbone.forward_features(images),
                                       rtol=1e-5, atol=1e-5)
    # A classifier head for fine-tuning leaves the features as they were; an argument that changes the
    # architecture is refused.
    with_head = timm.create_model(f"local-dir:{folder}", num_classes=5)
    images = torch.randn(1, 3, 256, 128)
    with torch.no_grad():
        torch.testing.assert_close(with_head.eval().forward_features(images), student.backbone.forward_features(images),
                                   rtol=0, atol=0)
        assert with_head(images).shape == (1, 5)
    with pytest.raises(ValueError, match="img_size would change the exported architecture"):
        timm.create_model(f"local-dir:{folder}", img_size=(224, 224))


@pytest.mark.e2e
def test_plain_timm_refuses_an_export(vit_ti, tmp_path):
    """Without dpal, timm cannot build the export's architecture: its unknown-model error, never a stock ViT."""
    folder = export_student(vit_ti, tmp_path / "student", program=False)
    code = f"import timm; timm.create_model('local-dir:{folder}')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Unknown model (dpal_vit_ti)" in done.stderr, done.stderr[-2000:]
    # importing dpal after timm registers just the same
    code = f"import timm, dpal; print(type(timm.create_model('local-dir:{folder}')).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "_MatrixResizeViT", done.stderr[-2000:]


def test_swin_export_round_trip(swin_t, tmp_path):
    trained = swin_t  # random weights (the round trip is what is tested)
    export_student(trained, tmp_path / "swin", program=False)
    model = load_student(tmp_path / "swin" / "model.safetensors")
    assert read_student_config(tmp_path / "swin")["timm_kwargs"]["drop_path_rate"] == pytest.approx(0.1)
    for height, width in [(256, 128), (128, 96)]:
        images = torch.randn(1, 3, height, width)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(images), trained.backbone.forward_features(images),
                                       rtol=0, atol=0)


def test_bad_exports_are_named(vit_ti, tmp_path):
    import dpal  # noqa: F401

    folder = export_student(vit_ti, tmp_path / "a", program=False)
    weights, config_path = folder / "model.safetensors", folder / "config.json"
    # Stale config beside other weights: refused, not silently mixed.
    other = export_student(build_student(get_recipe("path-l_vit-ti")), tmp_path / "b", program=False)
    (other / "config.json").replace(config_path)
    with pytest.raises(CheckpointError, match="differs from the one stored in model.safetensors"):
        load_student(folder)
    # The weights alone are self-describing.
    config_path.unlink()
    assert [b.attn.num_heads for b in load_student(weights).blocks][-1] == 12
    # Weights changed after the export (metadata kept): the checksum refuses them, through timm as well.
    state = load_file(weights)
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    state["blocks.0.attn.qkv.bias"] = state["blocks.0.attn.qkv.bias"] + 1e-3
    save_file(state, weights, metadata=metadata)
    config_path.write_text(json.dumps({"architecture": "dpal_vit_ti", "dpal": json.loads(metadata.popitem()[1])}))
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_student(folder)
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        timm.create_model(f"local-dir:{folder}")
    # Truncated file.
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_student(weights)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_student(tmp_path / "missing")
    # An export of the earlier format (NAME.safetensors + NAME.json): refused with the way to a current one.
    save_file(state, tmp_path / "student.safetensors")
    with pytest.raises(CheckpointError, match="format version 1 .*train_student export RUN_DIR"):
        load_student(tmp_path / "student")


@pytest.mark.parametrize("change", [{"timm_kwargs": {"checkpoint_path": "OTHER"}},
                                    {"timm_kwargs": {"pretrained_cfg_overlay": {"file": "OTHER"}}},
                                    {"timm_name": "resnet50"}])
def test_export_config_cannot_make_timm_load_other_files(vit_ti, tmp_path, change):
    """The config of an export is data: only the architecture arguments an export carries reach timm."""
    folder = export_student(vit_ti, tmp_path / "student", program=False)
    weights, config_path = folder / "model.safetensors", folder / "config.json"
    other = tmp_path / "other.pth"  # a file timm would load (and then refuse) if the key reached it
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    timm_config = json.loads(config_path.read_text())
    config = timm_config["dpal"]
    for key, value in change.items():
        config[key] = {**config[key], **{k: (str(other) if v == "OTHER" else v) for k, v in value.items()}} \
            if isinstance(value, dict) else value
    config_path.write_text(json.dumps(timm_config))
    save_file({k: v for k, v in load_file(weights).items()}, weights)  # drop the embedded copy of the config
    with pytest.raises(CheckpointError, match="refused|not a student architecture"):
        load_student(weights)


def test_students_are_registered_timm_architectures():
    import dpal.timm_models

    assert sorted(dpal.timm_models.REGISTERED) == sorted(timm.list_models("dpal_*"))
    model = timm.create_model("dpal_vit_ti", last_block_heads=12)
    assert [b.attn.num_heads for b in model.blocks] == [6] * 11 + [12]
    with pytest.raises(ValueError, match="unknown argument.*patch_size.*accepted: drop_path_rate"):
        timm.create_model("dpal_vit_s", patch_size=8)
    with pytest.raises(ValueError, match="no published weights"):
        timm.create_model("dpal_swin_t", pretrained=True)
