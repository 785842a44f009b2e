"""The training step's machinery without files: views rendered ahead on another thread (and CUDA stream) are
the render calls' pixels, the hand-over keeps order and errors, and --compile keeps the checkpoint names."""
import pytest
import torch

from dpal.recipes import get_recipe
from dpal.views import background_indices, render_local_crops, render_view_sets, sample_local_crops, sample_view_sets
from formats.targets import Targets
from runtime.ahead import HostCopy, RunAhead
from helpers import SMALL, random_images
from train_student.data import FeedBatch
from train_student.prefetch import render_ahead
from train_student.step import CachedTargets, COMPILED_PARTS, build_distiller


def _batch(seed: int, n: int, pool: list[torch.Tensor]) -> FeedBatch:
    generator = torch.Generator().manual_seed(seed)
    records = sample_view_sets(generator, n, num_backgrounds=len(pool), cfg=SMALL)
    return FeedBatch(indices=torch.arange(n), images=random_images(seed, n),
                     backgrounds={i: pool[i] for i in background_indices(records).tolist()},
                     view_params=records, local_params=sample_local_crops(generator, n, SMALL),
                     targets=Targets(global_target=torch.randn(n, 8, generator=generator),
                                     local_target=torch.randn(n, 4, 8, generator=generator),
                                     local_mask=torch.rand(n, 4, generator=generator),
                                     relation_target=torch.rand(n, 3, 3, generator=generator)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_views_rendered_ahead_are_the_render_calls_pixels(device):
    """Packed (each shared background once), planned and rendered on the producer thread (its own stream on
    CUDA), handed over in order: bit for bit what render_view_sets / render_local_crops give on this thread."""
    device = torch.device(device)
    pool = random_images(90, 2, 30, 120)
    batches = [_batch(seed, n, pool) for seed, n in ((91, 5), (92, 3), (93, 6))]
    with render_ahead(iter(batches), SMALL, device, CachedTargets()) as ahead:
        ready = list(ahead)
    assert len(ready) == len(batches)
    for batch, got in zip(batches, ready):
        views = render_view_sets(batch.images, batch.backgrounds, batch.view_params, SMALL, device)
        assert torch.equal(got.views["global_view"], views.global_view)
        assert torch.equal(got.views["crowd_view"], views.crowd)
        assert torch.equal(got.views["local_views"], render_local_crops(batch.images, batch.local_params, SMALL, device))
        assert torch.equal(got.staged["global_target"].cpu(), batch.targets.global_target)
        assert torch.equal(got.indices, batch.indices)


def test_run_ahead_keeps_order_raises_the_producers_error_and_closes_its_source():
    closed = []

    def numbers():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    with RunAhead(numbers(), lambda i: {"value": torch.full((2,), i)}, torch.device("cpu"), depth=2) as ahead:
        assert [int(next(ahead)["value"][0]) for _ in range(3)] == [0, 1, 2]
    assert closed == [True]  # leaving the block stopped the producer, which closed the generator

    def produce(i):
        if i == 2:
            raise ValueError("item 2 is bad")
        return i

    ahead = RunAhead(iter(range(5)), produce, torch.device("cpu"))
    assert [next(ahead), next(ahead)] == [0, 1]
    with pytest.raises(ValueError, match="item 2 is bad"):
        next(ahead)
    assert next(ahead, None) is None  # closed after the error
    values = torch.arange(3.0)
    assert HostCopy({"v": values}).wait()["v"] is values  # host tensors are handed back as they are


def test_compile_keeps_the_names_that_checkpoints_and_exports_use():
    """`--compile` compiles in place (nn.Module.compile): state-dict keys stay the eager ones; nothing is
    traced until the first step, so this costs no compilation."""
    recipe, cpu = get_recipe("path-b_vit-ti"), torch.device("cpu")
    torch.manual_seed(0)
    eager, _, _ = build_distiller(recipe, cpu, 1e-4)
    torch.manual_seed(0)
    compiled, ema, optimizer = build_distiller(recipe, cpu, 1e-4, compile_model=True)
    assert COMPILED_PARTS == ("student", "decoder")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert list(ema.state_dict()) == list(compiled.student.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(compiled.state_dict().values(), eager.state_dict().values()))
