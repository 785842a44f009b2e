"""`runtime.startup.startup`: the process-wide state a command runs with, set by that one call, in a fresh
process each (the test session has made the call already)."""
import subprocess
import sys


def _threads_after(script: str) -> int:
    probe = "import torch\ntorch.set_num_threads(3)\n" + script + "\nprint(torch.get_num_threads())\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_startup_keeps_torch_threads_across_ffcv():
    started = _threads_after("from runtime.startup import startup\nstartup(reuse_freed_memory=True)\n"
                             "import formats.images, train_student.data")
    assert started == 3


def test_without_startup_ffcv_sets_torch_threads_to_one():
    """What `startup` is there for: importing the images module alone leaves torch one thread."""
    assert _threads_after("import formats.images") == 1
