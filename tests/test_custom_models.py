"""Teachers and students named after timm models (`timm:NAME`) and composed recipes (TEACHER+STUDENT).

Real timm models at their own sizes (ViT-Ti, the smallest timm ViT, as the cached teacher), weights written to
files as users have them (safetensors with a classifier head; torch files), the real command lines.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from cache_teacher.__main__ import main as cache_main
from cache_teacher.verify import info, verify
from dpal.checkpoints import CheckpointError
from dpal.config import StudentSpec, TeacherSpec, ViewConfig
from dpal.pairs import resolve_recipe
from dpal.recipes import RECIPES, TEACHERS, register_student, register_teacher
from dpal.students import Student, build_student, load_initial_weights, load_student, student_spec
from dpal.teachers import load_teacher, teacher_spec
from dpal.timm_backbones import BackboneError, view_size_problem
from formats.exports import export_student
from helpers import write_packed_inputs
from train_student.__main__ import main as train_main

TEACHER = "timm:vit_tiny_patch16_224"
# FFCV's JIT-compiled JPEG decoder trips a harmless numba finalizer KeyError when collected in-process.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _timm_weights(path, name: str, seed: int = 0, **kwargs) -> dict:
    """A timm model's full state dict (classifier head included, as timm saves it) written to `path`."""
    torch.manual_seed(seed)
    state_dict = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    if str(path).endswith(".safetensors"):
        save_file(state_dict, str(path))
    else:
        torch.save({"model": state_dict}, path)
    return state_dict


def test_descriptions_are_read_off_the_timm_model():
    vit, swin = teacher_spec(TEACHER), teacher_spec("timm:swin_tiny_patch4_window7_224")
    assert (vit.arch, vit.timm_name, vit.width, vit.num_heads, vit.token_stride, vit.has_cls) == \
        ("vit", "vit_tiny_patch16_224", 192, 3, 16, True)
    assert (swin.arch, swin.width, swin.depth, swin.token_stride, swin.has_cls) == ("swin", 768, 12, 32, False)
    student = student_spec("timm:vit_small_patch16_224")
    assert (student.width, student.num_heads, student.inter_dim) == (384, 6, None)
    recipe = resolve_recipe(f"{TEACHER}+timm:vit_small_patch16_224")
    assert (recipe.decoder.in_dim, recipe.decoder.out_dim) == (384, 192)  # student width -> teacher width
    assert resolve_recipe("path-b+vit-ti") == RECIPES["path-b_vit-ti"]  # a published pair is the published recipe


@pytest.mark.parametrize("name, says", [
    ("timm:resnet18", "is a ResNet, whose tokens the method cannot use; accepted: a timm VisionTransformer"),
    ("timm:no_such_model", "timm has no model named 'no_such_model'; accepted:"),
    ("sam-b", "unknown teacher 'sam-b'; accepted: path-b, path-l, solider-b, or a timm"),
])
def test_unusable_teachers_are_refused_in_one_line(name, says, tmp_path, capsys):
    with pytest.raises(BackboneError, match=says):
        teacher_spec(name)
    argv = ["run", "--teacher", name, "--weights", "w.pth", "--images", "i", "--backgrounds", "b", "-K", "1",
            "--out", str(tmp_path / "s.zarr")]
    with pytest.raises(SystemExit) as stop:
        cache_main(argv)
    assert stop.value.code == 2
    assert says.split(";")[0].split(" '")[0] in capsys.readouterr().err.splitlines()[-1]


def test_a_stride_that_does_not_tile_the_views_is_refused():
    dinov2 = teacher_spec("timm:vit_small_patch14_reg4_dinov2")
    assert view_size_problem(dinov2, ViewConfig()).startswith(
        "teacher timm:vit_small_patch14_reg4_dinov2: its token stride 14 does not divide the view sizes (global "
        "256x128, crowd 256x256)")
    assert view_size_problem(teacher_spec(TEACHER), ViewConfig()) is None
    with pytest.raises(BackboneError, match="student vit-ti .token stride 16. cannot follow teacher"):
        resolve_recipe("timm:vit_small_patch14_reg4_dinov2+vit-ti")
    with pytest.raises(BackboneError, match="accepted: .* with ViT patch 16 or Swin stride 32"):
        student_spec("timm:vit_small_patch14_dinov2")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_teacher_weights_load_key_for_key(tmp_path, suffix):
    weights = tmp_path / f"teacher{suffix}"
    state_dict = _timm_weights(weights, "vit_tiny_patch16_224", depth=2)  # head included, as timm saves it
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, dynamic_img_size=True).eval()
    reference.load_state_dict(state_dict)
    spec = teacher_spec(TEACHER)
    with pytest.raises(CheckpointError, match=rf"teacher{suffix}: does not match {TEACHER}") as refused:
        load_teacher(spec, weights)  # two blocks in the file, twelve in the model
    assert "blocks.2.attn.qkv.weight" in refused.value.missing
    two_blocks = spec.__class__(**{**spec.__dict__, "depth": 2})
    with pytest.raises(BackboneError, match="depth 2 .timm builds 12."):
        load_teacher(two_blocks, weights)  # a description that is not what timm builds for the name


def test_register_tokens_are_not_teacher_tokens(tmp_path):
    weights = tmp_path / "dinov2.safetensors"
    state_dict = _timm_weights(weights, "vit_small_patch14_reg4_dinov2")
    teacher = load_teacher("timm:vit_small_patch14_reg4_dinov2", weights)
    images = torch.randn(1, 3, 224, 112)
    reference = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                                  dynamic_img_size=True).eval()
    reference.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("head.")})
    features = reference.forward_features(images)  # CLS, 4 registers, 16 x 8 patches
    tokens = teacher(images)
    assert tokens.grid == (16, 8) and tokens.tokens.shape[1] == 1 + 16 * 8
    assert torch.equal(tokens.tokens, torch.cat([features[:, :1], features[:, 5:]], dim=1))


def test_timm_student_starts_from_its_weights_and_exports(tmp_path):
    weights = tmp_path / "vit_small.safetensors"
    state_dict = _timm_weights(weights, "vit_small_patch16_224")  # position grid 14 x 14, at 224
    student = build_student(resolve_recipe(f"{TEACHER}+timm:vit_small_patch16_224"))
    load_initial_weights(student, weights)
    loaded = student.backbone.state_dict()
    assert torch.equal(loaded["blocks.3.mlp.fc1.weight"], state_dict["blocks.3.mlp.fc1.weight"])
    assert loaded["pos_embed"].shape == (1, 1 + 16 * 8, 384)  # resized by timm to the 256 x 128 training grid
    assert student.backbone.blocks[-1].attn.num_heads == 3  # the teacher's heads in the last block
    folder = export_student(student, tmp_path / "export", program=False)
    images = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        assert torch.equal(load_student(folder).forward_features(images),
                           student.eval().backbone.forward_features(images))
    with pytest.raises(CheckpointError, match="vit_small.safetensors: does not match student timm:vit_tiny"):
        load_initial_weights(Student(build_student(resolve_recipe(f"{TEACHER}+timm:vit_tiny_patch16_224")).config),
                             weights)


@pytest.fixture(scope="module")
def timm_store(tmp_path_factory):
    """A store cached by the command line from a timm ViT-Ti teacher's safetensors file."""
    root = write_packed_inputs(tmp_path_factory.mktemp("timm"), persons=4, backgrounds=2, seed=5, workers=1,
                               teacher_spec=teacher_spec(TEACHER))
    weights = root / "vit_tiny.safetensors"
    _timm_weights(weights, "vit_tiny_patch16_224")
    inputs = ["--images", str(root / "persons.beton"), "--backgrounds", str(root / "backgrounds.beton")]
    assert cache_main(["run", "--teacher", TEACHER, "--weights", str(weights), *inputs, "-K", "1", "--out",
                       str(root / "store.zarr"), "--chunk-images", "2", "--calibration-images", "2",
                       "--batch-size", "2", "--no-progress"]) == 0
    return root, weights, inputs


def test_store_records_the_timm_teacher_it_was_cached_with(timm_store, capsys):
    root, weights, _ = timm_store
    attrs = json.loads((root / "store.zarr" / "zarr.json").read_text())["attributes"]["dpal_store"]
    assert attrs["teacher"] == TEACHER
    assert attrs["teacher_spec"] == {"name": TEACHER, "arch": "vit", "timm_name": "vit_tiny_patch16_224",
                                     "width": 192, "depth": 12, "num_heads": 3, "patch_size": 16,
                                     "token_stride": 16, "has_cls": True}
    assert attrs["weights_file"] == "vit_tiny.safetensors"
    assert attrs["checkpoint_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    passed, _ = verify(str(root / "store.zarr"), str(weights), samples=1)  # the description rebuilds the teacher
    assert passed
    info(str(root / "store.zarr"))
    assert f"teacher {TEACHER} (weights vit_tiny.safetensors, checkpoint sha256" in capsys.readouterr().out


def test_dry_run_plans_a_timm_teacher_store(timm_store, tmp_path, capsys):
    _, weights, inputs = timm_store
    assert cache_main(["run", "--teacher", "timm:swin_tiny_patch4_window7_224", "--weights", str(weights), *inputs,
                       "-K", "4", "--out", str(tmp_path / "plan.zarr"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: teacher timm:swin_tiny_patch4_window7_224, 4 images x K=4 view sets" in out
    assert not (tmp_path / "plan.zarr").exists()


def test_training_refuses_a_store_of_another_teacher(timm_store, tmp_path, capsys):
    root, _, inputs = timm_store
    argv = ["--teacher", "timm:vit_small_patch16_224", "--student", "vit-ti", "--store", str(root / "store.zarr"),
            *inputs, "--out", str(tmp_path / "run"), "--workers", "1", "--no-progress", "--device", "cpu"]
    assert train_main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "does not fit recipe timm:vit_small_patch16_224+vit-ti: teacher: store has 'timm:vit_tiny_patch16_224'" in line
    assert "width (store 192, this run 384)" in line


@pytest.mark.e2e
def test_training_on_a_timm_teacher_store_records_what_it_used(timm_store, tmp_path):
    root, _, inputs = timm_store
    student_weights = tmp_path / "vit_small.pth"
    _timm_weights(student_weights, "vit_small_patch16_224")
    run_dir = tmp_path / "run"
    argv = ["--teacher", TEACHER, "--student", "timm:vit_small_patch16_224", "--student-weights",
            str(student_weights), "--store", str(root / "store.zarr"), *inputs, "--out", str(run_dir),
            "--batch-size", "2", "--max-steps", "1", "--epochs", "1", "--warmup-epochs", "0", "--workers", "1",
            "--no-progress", "--device", "cpu", "--no-export-program"]
    assert train_main(argv) == 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["recipe"] == f"{TEACHER}+timm:vit_small_patch16_224"
    assert record["teacher_spec"]["width"] == 192 and record["student_spec"]["width"] == 384
    assert record["student_weights_sha256"] == hashlib.sha256(student_weights.read_bytes()).hexdigest()
    assert record["store_identity"]["teacher_spec"] == record["teacher_spec"]
    assert load_student(run_dir / "student_ema").forward_features(torch.zeros(1, 3, 256, 128)).shape == (1, 129, 384)


def test_registered_teacher_is_known_by_name(tmp_path, capsys):
    spec = TeacherSpec("probe-vit", "vit", "vit_base_patch16_224", width=64, depth=1, num_heads=2, patch_size=16,
                       token_stride=16, has_cls=True)
    try:
        assert register_teacher(spec) is spec and teacher_spec("probe-vit") == spec
        assert resolve_recipe("probe-vit+vit-ti").decoder.out_dim == 64
        with pytest.raises(SystemExit):  # past the name check: the command refuses the missing input files
            cache_main(["run", "--teacher", "probe-vit", "--weights", "w.pth", "--images", "i", "--backgrounds", "b",
                        "-K", "1", "--out", str(tmp_path / "s.zarr"), "--batch-size", "0"])
        assert "unknown teacher" not in capsys.readouterr().err
        with pytest.raises(ValueError, match="'probe-vit' is registered already with another spec"):
            register_teacher(TeacherSpec(**{**spec.__dict__, "width": 128}))
    finally:
        TEACHERS.pop("probe-vit", None)


@pytest.mark.parametrize("spec, says", [
    (TeacherSpec("My_Vit", "vit", "vit_base_patch16_224", 64, 1, 2, 16, 16, True), "use lower-case letters"),
    (TeacherSpec("conv", "cnn", "resnet18", 64, 1, 2, 16, 16, False), "arch 'cnn' is not one of 'vit', 'swin'"),
    (StudentSpec("vit-ti", "vit", "vit_small_patch16_224", 384, 6, 0.0), "'vit-ti' is registered already"),
])
def test_registration_refuses_what_cannot_be_used(spec, says):
    with pytest.raises(ValueError, match=says):
        (register_teacher if isinstance(spec, TeacherSpec) else register_student)(spec)


@pytest.mark.e2e
def test_the_registration_example_of_the_docs_runs(timm_store):
    root = timm_store[0]
    example = re.findall(r"```python\n(.*?)```", (Path(__file__).parents[1] / "docs" / "custom-models.md").read_text(),
                         flags=re.S)
    assert len(example) == 1
    done = subprocess.run([sys.executable, "-c", example[0]], cwd=root, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((root / "runs" / "my-vit-ti" / "run.json").read_text())
    assert record["recipe"] == "my-vit+my-vit-ti" and record["teacher_spec"]["width"] == 128
