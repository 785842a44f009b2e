"""What several test modules share (test modules import from here, never from each other)."""
from __future__ import annotations

import functools
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dpal.config import TeacherSpec, ViewConfig
from dpal.recipes import TEACHERS

# A two-block ViT teacher on PATH-B's code path (released-layout checkpoint, load_teacher, render, targets) at a
# fraction of its CPU time; the commands take it through their `teachers` argument.
TINY = TeacherSpec("tiny-vit", "vit", "vit_base_patch16_224", width=32, depth=2, num_heads=2, patch_size=16,
                   token_stride=16, has_cls=True)
TEACHERS_WITH_TINY = dict(TEACHERS, **{TINY.name: TINY})

# Small view sizes: every step of the view pipeline at a fraction of the recipe's cost.
SMALL = ViewConfig(global_size=(32, 16), local_size=(16, 12), crowd_size=(32, 32), paste_y=(0, 14),
                   first_person_x=(0, 6), second_person_x_max=20)


def random_image(generator, height, width, channels=3):
    """Smooth colour gradients plus noise: hue, saturation and blur all have something to act on."""
    ys = torch.linspace(0, 1, height)[:, None, None]
    xs = torch.linspace(0, 1, width)[None, :, None]
    phase = torch.rand(1, 1, channels, generator=generator) * 6
    base = 0.5 + 0.4 * torch.sin(6 * ys + 4 * xs + phase)
    noise = 0.1 * torch.rand(height, width, channels, generator=generator)
    return ((base + noise).clamp(0, 1) * 255).round().to(torch.uint8)


def random_images(seed, count, low=20, high=90):
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high, (count, 2), generator=generator).tolist()
    return [random_image(generator, h, w) for h, w in sizes]


class RefAttention(nn.Module):
    """Attention with one fused qkv projection and timm's parameter names, as the original checkpoints hold it."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


# Ceilings as `kernels.bench.measure_ceilings` reports them on a GPU (copy, GEMM, its L2 probe, SMs), for pricing
# the cost model without one.
MEASURED_CEILINGS = {"copy_gbps": 3000.0, "matmul_tflops": 800.0, "l2_gbps": 6000.0, "sms": 132}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a test's rendezvous: fixed ports collide when test runs overlap."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_node_launcher(port: int, run_id: str) -> list[str]:
    """torchrun as one of two "nodes" of a job on this machine (--nnodes 2, one process each, c10d rendezvous
    on 127.0.0.1:`port`): what a two-machine cluster job runs, each node with its own launcher."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", run_id, "--max-restarts", "0"]


def can_mount_tmpfs() -> bool:
    """Whether this machine lets a test mount a tiny tmpfs in a private mount namespace (a real full disk)."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def write_packed_inputs(root: Path, *, persons: int, backgrounds: int, seed: int, workers: int,
                        teacher_spec) -> Path:
    """Synthetic persons and backgrounds under `root`, packed into persons.beton and backgrounds.beton, and a
    random-weight checkpoint of `teacher_spec` in the released layout as tiny.pth (torch seeded with 0)."""
    import numpy as np

    from cache_teacher.demo_data import write_backgrounds, write_person_images
    from cache_teacher.pack import pack
    from dpal.teachers import build_teacher, release_checkpoint

    rng = np.random.default_rng(seed)
    write_person_images(root / "persons", persons, rng)
    write_backgrounds(root / "backgrounds", backgrounds, rng)
    for name in ("persons", "backgrounds"):
        pack(root / name, root / f"{name}.beton", workers=workers, progress=False)
    torch.manual_seed(0)
    torch.save(release_checkpoint(build_teacher(teacher_spec)), root / "tiny.pth")
    return root


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `build(folder)` once per test run: under pytest-xdist every worker has its own
    session, so the first worker to ask builds it, under a lock in the run's shared temporary folder, and the
    others wait for it. A build that fails leaves no folder behind (the next one to ask tries again)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder above the workers' own
    folder = shared / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            (folder / ".built").touch()
    return folder


# The tiny training run of the training tests: 6 images, 2 view sets each, global batch 2, 4 steps.
TRAIN_IMAGES = 6
TRAIN_STEPS = 4
TRAIN_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def tiny_train_args(artefacts: dict, out, *extra, store=None) -> list[str]:
    """`train_student` arguments of the tiny run on `artefacts` (the `train_artefacts` fixture): a real lr from the
    first step (no warm-up) so that every step moves the weights visibly, a checkpoint every 2 steps."""
    return ["--recipe", "path-b_vit-ti", "--store", str(store or artefacts["store"]), "--images",
            str(artefacts["images"]), "--backgrounds", str(artefacts["backgrounds"]), "--out", str(out),
            "--batch-size", "2", "--lr", "1e-3", "--warmup-epochs", "0", "--epochs", "3", "--max-steps",
            str(TRAIN_STEPS), "--checkpoint-every", "2", "--workers", "1", "--no-progress", *extra]


def tiny_cache_args(artefacts: dict, out, *extra, views_per_image: int = 2) -> list[str]:
    """`cache_teacher run` arguments of the training tests' stores: the PATH-B checkpoint, images and backgrounds
    of `artefacts` (its "weights", "images" and "backgrounds"), `views_per_image` view sets per image, chunks
    and a calibration sample of 2 images."""
    return ["run", "--teacher", "path-b", "--weights", str(artefacts["weights"]), "--images", str(artefacts["images"]),
            "--backgrounds", str(artefacts["backgrounds"]), "-K", str(views_per_image), "--chunk-images", "2",
            "--calibration-images", "2", "--no-progress", "--out", str(out), *extra]


def compared_columns(metrics_csv: Path) -> list[list[float]]:
    """The columns of a run's metrics.csv that a resumed, validated or multi-process run must reproduce: the loss
    terms and the schedule (samples/s and data wait are timings)."""
    from train_student.metrics import LOSS_COLUMNS, read_metrics

    columns = LOSS_COLUMNS + ("lr", "ema_momentum", "moe_weight", "grad_norm")
    return [[row[key] for key in columns] for row in read_metrics(metrics_csv)]


def train_refusal(capsys, argv: list[str]) -> tuple[int, str]:
    """`train_student` run in this process: its exit status and what it wrote to stderr."""
    from train_student.__main__ import main

    status = main(argv)
    return status, capsys.readouterr().err


def run_python(*args, **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS` in a child process of this interpreter, output captured, unbuffered."""
    return subprocess.run([sys.executable, *args], env=TRAIN_ENV, capture_output=True, text=True, **kwargs)


def pack_demo_data(root: Path, *, persons: int) -> dict:
    """The built-in demo data (`cache_teacher demo-data`: persons, 3 backgrounds, a random PATH-B checkpoint)
    under root/inputs, packed by the command line into root/persons.beton and root/backgrounds.beton; returns
    the demo data's paths."""
    from cache_teacher.__main__ import main as cache_main
    from cache_teacher.demo_data import write_demo_data

    paths = write_demo_data(root / "inputs", persons=persons, backgrounds=3)
    for name in ("persons", "backgrounds"):
        assert cache_main(["pack", paths[name], str(root / f"{name}.beton")]) == 0
    return paths


# Profiled aten operators that launch no device work: allocations and flag flips.
_NO_LAUNCH_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::_unsafe_view",
                  "aten::scalar_tensor", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg"}


@functools.lru_cache(maxsize=None)
def launches_device_work(name: str) -> bool:
    """Whether the profiled operator `name` does device work itself: a kernel of its own (CPU or composite
    explicit), not a view, an allocation or a composite that only calls other operators."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None or name in _NO_LAUNCH_OPS:
        return False
    overloads = [getattr(packet, overload) for overload in packet.overloads()]
    if any(op.is_view for op in overloads):
        return False
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key)
               for op in overloads for key in ("CPU", "CompositeExplicitAutograd"))
