# The test session's explicit choice of how Triton runs the kernels, made before any test module imports
# triton (timm does): a TRITON_INTERPRET already set is kept, otherwise the interpreter runs them on CPU
# tensors exactly when no CUDA device is visible. Child processes inherit the choice through the environment.
from kernels import select_interpreter

select_interpreter()


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
    if not config.getoption("--cuda-cases"):
        return
    keep = [item for item in items if _runs_on_cuda(item)]
    config.hook.pytest_deselected(items=[item for item in items if not _runs_on_cuda(item)])
    items[:] = keep
