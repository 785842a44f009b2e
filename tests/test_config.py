"""--config FILE, --print-config and the Python API that takes the same options: flags override the file, every
key and value is checked as the command line checks it, a bad one is one line naming it and what is accepted."""
import json
import subprocess
import sys

import pytest
import yaml

import cache_teacher
from runtime.cli import ConfigError
import train_student
from train_student.__main__ import main as train_main

INPUTS = {"images": "persons.beton", "backgrounds": "backgrounds.beton", "out": "runs/a"}


def _printed(capsys, argv, main=train_main) -> dict:
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_flags_override_the_file_and_the_printed_config_reads_back(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("recipe: path-b_vit-s\nbatch-size: 64\nprogress: false\nstore: t.zarr\nblr: 2.0e-4\n"
                      "images: persons.beton\nbackgrounds: backgrounds.beton\nout: runs/a\n")
    printed = _printed(capsys, ["--config", str(config), "--batch-size", "32", "--seed", "5", "--print-config"])
    assert printed["recipe"] == "path-b_vit-s" and printed["batch-size"] == 32 and printed["seed"] == 5
    assert printed["progress"] is False and printed["blr"] == 2e-4 and printed["checkpoint-every"] == 1000
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert _printed(capsys, ["--config", str(again), "--print-config"]) == printed
    as_json = tmp_path / "printed.json"
    as_json.write_text(json.dumps(printed))
    assert _printed(capsys, ["--config", str(as_json), "--print-config"]) == printed


@pytest.mark.parametrize("text, message", [
    ("sede: 1\n", "unknown key 'sede'; accepted: accum-steps, backgrounds, batch-size"),
    ("seed: -1\n", "seed: -1 is out of range: must be 0..4294967295"),
    ("batch-size: 2.5\n", "batch-size: '2.5' is not an integer"),
    ("recipe: path-b_vit-xl\n", "recipe: unknown recipe 'path-b_vit-xl'; accepted: path-b_vit-ti"),
    ("progress: maybe\n", "progress: 'maybe' is not true or false"),
    ("seed: [1, 2\n", "not valid YAML"),
    ("- 1\n", "holds a list, not a mapping"),
])
def test_a_bad_config_is_one_line_naming_the_key(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        train_main(["--config", str(config), "--print-config"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and f"--config {config}: " in err and message in err, err


def test_python_api_builds_the_spec_the_command_line_builds(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"recipe": "path-b_vit-ti", "store": "t.zarr", "epochs": 30, **INPUTS}))
    spec = train_student.training_spec(str(config), epochs=50, progress=False, workers=1)
    assert (spec.recipe, spec.epochs, spec.progress, spec.store, spec.checkpoint_every) == \
        ("path-b_vit-ti", 50, False, "t.zarr", 1000)
    with pytest.raises(ConfigError, match="warmup_epochs: -1 is out of range: must be >= 0"):
        train_student.training_spec(str(config), warmup_epochs=-1)
    with pytest.raises(ConfigError, match="missing --store"):
        train_student.training_spec(recipe="path-b_vit-ti", **INPUTS)
    with pytest.raises(ConfigError, match="warm-up .* is longer than the run"):
        train_student.training_spec(str(config), epochs=3, warmup_epochs=4)

    run = cache_teacher.caching_spec({"teacher": "path-b", "weights": "w.pth", "images": "p.beton",
                                      "backgrounds": "b.beton", "out": "t.zarr"}, views_per_image=2)
    assert (run.teacher, run.views_per_image, run.target_format) == ("path-b", 2, "float16")
    with pytest.raises(ConfigError, match="missing --weights"):
        cache_teacher.caching_spec(teacher="path-b", images="p", backgrounds="b", out="o", views_per_image=1)
    with pytest.raises(ConfigError, match="options: semantic_weight: 2 is out of range: must be 0..1"):
        cache_teacher.caching_spec(teacher="solider-b", weights="w", images="p", backgrounds="b", out="o",
                                   views_per_image=1, semantic_weight=2.0)


def test_cache_teacher_run_takes_a_config_file(tmp_path, capsys):
    from cache_teacher.__main__ import main as cache_main

    config = tmp_path / "cache.yaml"
    config.write_text("teacher: path-b\nweights: w.pth\nimages: p.beton\nbackgrounds: b.beton\nviews-per-image: 4\n"
                      "format: int8\n")
    printed = _printed(capsys, ["run", "--config", str(config), "--out", "t.zarr", "-K", "2", "--print-config"],
                       main=cache_main)
    assert (printed["views-per-image"], printed["target-format"], printed["out"]) == (2, "int8", "t.zarr")
    done = subprocess.run([sys.executable, "-m", "cache_teacher", "run", "--config", str(config), "--codec", "zip"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'zip'" in done.stderr


def test_list_recipes_is_a_table(capsys):
    assert train_main(["--list-recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9 and lines[0].split()[:3] == ["recipe", "teacher", "(D_t)"]
    assert lines[6].split() == ["path-l_vit-b", "path-l", "(1024)", "vit-b", "(768)", "192", "128", "x", "2", "x",
                                "8", "200", "0.00025"]
