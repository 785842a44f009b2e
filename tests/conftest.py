# The test session's process-wide state, set before any test module imports triton (timm does) or FFCV, as
# each command sets it at its start: Triton's mode (a TRITON_INTERPRET already set is kept, otherwise the
# interpreter runs the kernels on CPU tensors exactly when no CUDA device is visible; child processes inherit
# the choice through the environment), then `formats.runtime.startup` (torch's threads across FFCV's import).
import sys

import pytest

from formats.runtime import startup
from kernels import select_interpreter

select_interpreter()
startup()


@pytest.fixture(autouse=True)
def restored_op_table():
    """The method's op table (`dpal.dispatch`) is process-wide: what a test registers or forces (a command run
    in-process registers the fused ops) is undone after it."""
    from dpal import dispatch

    ops = [value for name, module in list(sys.modules.items()) if name.startswith("dpal.")
           for value in vars(module).values() if isinstance(value, dispatch.Op)]
    saved = [(op, dict(op.implementations)) for op in ops], dispatch.reference_forced()
    yield
    for op, implementations in saved[0]:
        op.implementations = implementations
    dispatch.force_reference(saved[1])
