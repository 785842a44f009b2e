"""`helpers.built_once`, what the run-wide fixtures (the training inputs, the reference run, the sm_90 report) are
built with: once per test run, also when pytest-xdist workers ask for the same folder at the same time, and a
failed build leaves nothing that a later one would take for done."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import built_once


class BaseTemp:
    """What `built_once` asks of pytest's tmp_path_factory: the session's base folder."""
    def __init__(self, path: Path):
        self.path = path

    def getbasetemp(self) -> Path:
        return self.path


def test_a_folder_is_built_once_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    factory, builds = BaseTemp(tmp_path), []

    def failing(folder):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("the build failed")
    with pytest.raises(RuntimeError, match="the build failed"):
        built_once(factory, "inputs", failing)
    assert not (tmp_path / "inputs").exists()

    def build(folder):
        builds.append(folder)
        (folder / "made.txt").write_text("made")
    first, second = built_once(factory, "inputs", build), built_once(factory, "inputs", build)
    assert first == second == tmp_path / "inputs" and builds == [first]
    assert (first / "made.txt").read_text() == "made"


def test_workers_asking_at_once_share_one_build(tmp_path):
    # Two xdist workers have their own base folders under one run folder: both get the run folder's build.
    script = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        sys.path.insert(0, sys.argv[1])
        from helpers import built_once
        class BaseTemp:
            def getbasetemp(self):
                return Path(sys.argv[2]) / os.environ["PYTEST_XDIST_WORKER"]
        def build(folder):
            with open(Path(sys.argv[2]) / "builders.txt", "a") as f:
                f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
            time.sleep(1.0)  # the other worker asks meanwhile
            (folder / "made.txt").write_text("made")
        print(built_once(BaseTemp(), "shared", build))
    """)
    tests = str(Path(__file__).resolve().parent)
    workers = [subprocess.Popen([sys.executable, "-c", script, tests, str(tmp_path)], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(os.environ, PYTEST_XDIST_WORKER=name)) for name in ("gw0", "gw1")]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), [err[-2000:] for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {str(tmp_path / "shared")}
    assert len((tmp_path / "builders.txt").read_text().split()) == 1
    assert (tmp_path / "shared" / "made.txt").read_text() == "made"
