"""The README's commands, run as written, in order, on the built-in data (6 synthetic persons, 3 backgrounds, a
random-weight PATH-B checkpoint, under the README's own file names).

What is not run as written: the `make` targets (they are the test suite and the demo themselves) and lines
with `...`. Training commands get `--config small.yaml` appended (2 steps at batch 2: the recipe's 200 epochs at
batch 256 do not fit 6 images); the Python example's `train.yaml` holds the same small settings."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"batch-size": 2, "epochs": 1, "warmup-epochs": 0, "max-steps": 2, "workers": 1, "progress": False}


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block of the README, in order."""
    return re.findall(r"```(bash|python)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = (line.split(" #")[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.e2e
def test_every_readme_command_runs(tmp_path):
    from cache_teacher.demo_data import write_demo_data

    write_demo_data(tmp_path, persons=6, backgrounds=3)
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(SMALL))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({**SMALL, "recipe": "path-b_vit-ti", "images": "persons.beton",
                                                         "backgrounds": "backgrounds.beton"}))
    env = {"PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    ran = []
    for language, text in readme_blocks():
        if language == "python":
            steps = [[sys.executable, "-c", text]]
        else:
            steps = []
            for command in commands(text):
                if command.startswith(("make ", ". ")) or "..." in command:
                    continue
                argv = shlex.split(command)
                assert argv[:2] == ["python", "-m"], f"README command not covered by this test: {command}"
                if argv[2] == "train_student" and argv[3:4] not in (["export"], ["--list-recipes"]) and \
                        "--print-config" not in argv:
                    argv += ["--config", "small.yaml"]
                steps.append([sys.executable, *argv[1:]])
        for argv in steps:
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stderr[-3000:]}"
            ran.append((argv, done.stdout))
    modules = [argv[2] + (" " + argv[3] if argv[3:4] and not argv[3].startswith("-") else "") for argv, _ in ran
               if argv[1] == "-m"]
    assert modules[:5] == ["cache_teacher pack", "cache_teacher pack", "cache_teacher run", "cache_teacher verify",
                           "cache_teacher info"] and "train_student export" in modules
    assert sum(argv[1] == "-c" for argv, _ in ran) == 2  # both Python examples
    printed = yaml.safe_load(next(out for argv, out in ran if "--print-config" in argv))
    assert printed["out"] == "runs/vit-ti-again" and printed["max-steps"] == 2 and printed["batch-size"] == 2
    for folder in ("runs/vit-ti/student_ema", "runs/vit-ti-api/student_ema"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["config.json", "model.pt2",
                                                                         "model.safetensors"]
