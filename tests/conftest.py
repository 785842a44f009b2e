# The test session's process-wide state, set before any test module imports triton (timm does) or FFCV, as
# each command sets it at its start: Triton's mode (a TRITON_INTERPRET already set is kept, otherwise the
# interpreter runs the kernels on CPU tensors exactly when no CUDA device is visible; child processes inherit
# the choice through the environment), then `runtime.startup.startup` (torch's threads across FFCV's import).
import sys
from pathlib import Path

import pytest

from kernels import select_interpreter
from runtime.startup import startup

select_interpreter()
startup()

from helpers import (TRAIN_IMAGES, built_once, pack_demo_data, run_python, tiny_cache_args,  # noqa: E402
                     tiny_train_args)


@pytest.fixture(autouse=True)
def restored_op_table():
    """The method's op table (`dpal.dispatch`) is process-wide: what a test registers or forces (a command run
    in-process registers the fused ops) is undone after it."""
    from dpal import dispatch

    # Copies of the module tables: a thread a test left running may still import into them.
    ops = [value for name, module in list(sys.modules.items()) if name.startswith("dpal.")
           for value in list(vars(module).values()) if isinstance(value, dispatch.Op)]
    saved = [(op, dict(op.implementations)) for op in ops], dispatch.reference_forced()
    yield
    for op, implementations in saved[0]:
        op.implementations = implementations
    dispatch.force_reference(saved[1])


@pytest.fixture(autouse=True)
def restored_torch_settings():
    """What a command run in-process sets for the rest of its process (the trainer's --deterministic algorithms,
    its compute threads) is put back after each test, so that no test runs under another's settings."""
    import torch

    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def quick_sweep(tmp_path_factory) -> dict:
    """The report of `kernels.sweep --quick` (the representative kernels compiled for sm_90; no GPU needed),
    compiled once per test run for every test that reads it."""
    import json
    import os
    import subprocess

    def compile_report(folder):
        done = subprocess.run([sys.executable, "-m", "kernels.sweep", "--quick", "--json", str(folder / "sweep.json")],
                              env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads((built_once(tmp_path_factory, "quick_sweep", compile_report) / "sweep.json").read_text())


@pytest.fixture(scope="session")
def train_artefacts(tmp_path_factory) -> dict:
    """The training tests' inputs, made once per test run: the demo data (TRAIN_IMAGES persons, 3 backgrounds,
    a random PATH-B checkpoint) packed, and a float16 store of 2 view sets per image written by `cache_teacher
    run` in-process (its own tests run it as a child process). Tests copy what they change."""
    from cache_teacher.__main__ import main as cache_main

    def artefacts(root) -> dict:
        return {"root": root, "store": root / "store.zarr", "images": root / "persons.beton",
                "backgrounds": root / "backgrounds.beton", "weights": str(root / "inputs" / "path-b.pth")}

    def cache(root):
        assert pack_demo_data(root, persons=TRAIN_IMAGES)["weights"] == artefacts(root)["weights"]
        assert cache_main(tiny_cache_args(artefacts(root), root / "store.zarr")) == 0
    return artefacts(built_once(tmp_path_factory, "train", cache))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, train_artefacts) -> Path:
    """The tiny training run (`tiny_train_args`) as one process runs it uninterrupted, its last two checkpoints
    kept: what resumed, validated and multi-process runs are compared with. Tests copy what they change."""
    def train(out):
        done = run_python("-m", "train_student", *tiny_train_args(train_artefacts, out, "--keep-checkpoints", "2"))
        assert done.returncode == 0, done.stderr
    return built_once(tmp_path_factory, "reference_run", train)


def pytest_addoption(parser):
    parser.addoption("--cuda-cases", action="store_true",
                     help="run only the cases that run on a CUDA device when one is visible (marked `cuda`, "
                          "skipped without CUDA, or parametrised with device 'cuda'): the acceptance run's CUDA tests")


def _runs_on_cuda(item) -> bool:
    if item.get_closest_marker("cuda") is not None:
        return True
    if any("CUDA" in mark.kwargs.get("reason", "") for mark in item.iter_markers("skipif")):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(value == "cuda" for value in params.values())


def pytest_collection_modifyitems(config, items):
    """`--cuda-cases` keeps only the cases that run on a CUDA device; tests marked `cuda` need one: without it
    each is skipped, with the reason in the summary."""
    import torch

    if config.getoption("--cuda-cases"):
        keep = [item for item in items if _runs_on_cuda(item)]
        config.hook.pytest_deselected(items=[item for item in items if not _runs_on_cuda(item)])
        items[:] = keep
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
