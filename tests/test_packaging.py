"""Packaging: every third-party package the code imports is declared, the test tools only in the `test` extra,
and the console commands point at the command lines' entry points."""
import ast
import importlib
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dpal", "runtime", "formats", "kernels", "cache_teacher", "train_student")


def _requirement_names(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {re.split(r"[<>=!~;\[ ]", line)[0].lower().replace("_", "-") for line in lines if line}


def _imported_modules(folders) -> set[str]:
    modules = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - set(PACKAGES) - {"acceptance", "tests"}


def test_every_imported_package_is_declared():
    declared = _requirement_names(ROOT / "requirements.txt")
    distributions = importlib.metadata.packages_distributions()
    # a module counts as declared when one distribution providing it is (cv2: opencv-python-headless)
    undeclared = sorted(module for module in _imported_modules(PACKAGES) if not any(
        dist.lower().replace("_", "-") in declared for dist in distributions.get(module, [module])))
    assert undeclared == [], f"imported but not declared in requirements.txt: {undeclared}"
    assert "pytest" not in declared and "pytest" in _requirement_names(ROOT / "requirements-test.txt")
    assert "pytest" not in _imported_modules(PACKAGES)


def test_console_commands_name_the_entry_points():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["scripts"]) == {"dpal-cache", "dpal-train", "dpal-kernel-bench"}
    for target in project["scripts"].values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    assert (ROOT / "LICENSE").read_text().startswith("MIT License") and "the DPAL contributors" in \
        (ROOT / "LICENSE").read_text()


def test_install_stamp_is_named_by_the_content_of_what_it_installs_from(tmp_path):
    """`make install` reinstalls when requirements*.txt or pyproject.toml change in content, and not when they are
    only touched or checked out again (new mtimes). Checked with `make -q` (nothing runs) on a copy of the files."""
    import hashlib
    import os
    import shutil
    import subprocess

    inputs = ("requirements.txt", "requirements-test.txt", "pyproject.toml")  # INSTALL_INPUTS, in its order
    for name in ("Makefile", *inputs):
        shutil.copy(ROOT / name, tmp_path / name)

    def stamp() -> Path:
        content = b"".join((tmp_path / name).read_bytes() for name in inputs)
        return tmp_path / ".venv" / f".installed-{hashlib.sha256(content).hexdigest()[:16]}"

    def up_to_date() -> bool:
        done = subprocess.run(["make", "-q", "install"], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode in (0, 1), done.stderr
        return done.returncode == 0

    dry_run = subprocess.run(["make", "-n", "install"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert f"touch {stamp().relative_to(tmp_path)}" in dry_run  # the name make computes is the content's sha256
    assert not up_to_date()
    stamp().parent.mkdir()
    stamp().touch()
    assert up_to_date()
    for name in inputs:  # a later mtime than the stamp: still installed
        os.utime(tmp_path / name, (stamp().stat().st_mtime + 60,) * 2)
    assert up_to_date()
    with open(tmp_path / "requirements.txt", "a") as requirements:  # an edit: a new stamp name, so a reinstall
        requirements.write("# pinned again\n")
    assert not up_to_date()
