"""The fused ops make no host synchronisation on the step path, forward or backward (after a first call, which
may upload per-shape constants once). On CUDA: `torch.cuda.set_sync_debug_mode("error")` raises on any; on a
CPU, where nothing synchronises, the same step is watched for what would: a tensor made from host data
(`torch.tensor`, `lift_fresh`) or a device value read back (`.item()`, `bool(t)`: `_local_scalar_dense`)."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpal.losses import quantize_relation
from kernels import shapes
from kernels.bench import relation_inputs
from kernels.decoder_experts import expert_path
from kernels.relation_loss import relation_kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HOST_OPS = (torch.ops.aten._local_scalar_dense, torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy)


class HostTraffic(TorchDispatchMode):
    """Records every op that reads a value back to the host or makes a tensor from host data."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in HOST_OPS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_synchronisation():
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        with HostTraffic() as traffic:
            yield
        assert traffic.ops == []


def test_the_watch_sees_what_it_claims():
    with pytest.raises(AssertionError if DEVICE == "cpu" else RuntimeError):
        with no_host_synchronisation():
            torch.tensor([1, 2], device=DEVICE).sum().item()


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["float16", "int8"])
def test_relation_step_has_no_host_synchronisation(fmt):
    y64, probs = relation_inputs(*shapes.RELATION_TEST_SHAPES[3], torch.Generator().manual_seed(0))
    y = y64.to(DEVICE, torch.float32).requires_grad_()
    target = (probs.half(), None) if fmt == "float16" else quantize_relation(probs)
    target = [None if t is None else t.to(DEVICE) for t in target]
    relation_kl(y, *target).backward()  # first call: backward's tile pairs are uploaded once for this shape
    with no_host_synchronisation():
        relation_kl(y, *target).backward()


@pytest.mark.cuda
def test_decoder_step_has_no_host_synchronisation():
    batch, patterns, dim, out_dim, tokens = shapes.DECODER_TEST_SHAPES[1]
    generator = torch.Generator().manual_seed(0)
    features = dim * out_dim

    def leaf(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=generator) * scale + shift).to(DEVICE).requires_grad_()

    inputs = [leaf(batch, patterns, dim), torch.rand(batch, patterns, generator=generator).softmax(-1).to(DEVICE),
              leaf(batch, tokens, dim), leaf(features, dim, scale=dim ** -0.5), leaf(features, scale=0.1),
              leaf(features, scale=0.1, shift=1.0), leaf(features, scale=0.1), leaf(out_dim, scale=0.1, shift=1.0),
              leaf(out_dim, scale=0.1)]
    y, loss = expert_path(*inputs)
    (y.square().mean() + loss).backward()
    with no_host_synchronisation():
        y, loss = expert_path(*inputs)
        (y.square().mean() + loss).backward()
