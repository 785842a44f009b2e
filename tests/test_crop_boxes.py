"""Crop boxes against torchvision's own RandomResizedCrop.get_params (DPAL_SPEC.md section 3, spec v3).

The distribution tests draw boxes with the project's sampler (records of `sample_view_sets` /
`sample_local_crops`, resolved by `crop_boxes` on the source's size) and with torchvision, and compare them
with chi-square tests of homogeneity on the box height, width, top, left and (height, width) jointly. A
p-value below P_DIFFERENT counts as a difference (as in the check that led to spec v3). The draws are seeded,
so the outcome is fixed; the self-checks show that the same test passes two torchvision samples against each
other and fails a sampler that places boxes by the old rounded rule.
"""

import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from dpal import views as V
from dpal.config import ViewConfig

P_DIFFERENT = 1e-4
SAMPLES = 1500  # per case and sampler; torchvision draws one box per Python call
CFG = ViewConfig()
# Sources (height, width): person-like, narrow (boxes often redrawn, a fifth or more fall back), wide (every
# global box falls back), tiny; the backgrounds' landscape, square and wide.
CASES = [
    ("global", (128, 64)), ("global", (256, 128)), ("global", (400, 150)), ("global", (90, 60)),
    ("global", (150, 400)), ("global", (9, 6)), ("local", (128, 64)), ("local", (150, 400)), ("person", (60, 90)),
    ("background", (480, 640)), ("background", (256, 256)), ("background", (100, 300)),
]
KINDS = {  # crop kind: (scale, aspect range, the ViewSetFields field of its crop blocks)
    "global": (CFG.global_scale, CFG.person_aspect, "global_view"),
    "person": (CFG.local_scale, CFG.person_aspect, "person"),
    "background": (CFG.background_scale, CFG.background_aspect, "background"),
    "local": (CFG.local_scale, CFG.person_aspect, None),
}


def project_blocks(kind: str, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    block = KINDS[kind][2]
    if block is None:
        return V.sample_local_crops(generator, n, CFG)[:, 0, V.LOCAL_CROP_BLOCK]
    return getattr(V.ViewSetFields.of(V.sample_view_sets(generator, n, num_backgrounds=1, cfg=CFG)), block)


def project_boxes(kind: str, size: tuple[int, int], n: int, seed: int) -> torch.Tensor:
    """[n, 4] (top, left, height, width) from the project's records, resolved on a source of `size`."""
    height, width = size
    return V.crop_boxes(project_blocks(kind, n, seed), torch.full((n,), height), torch.full((n,), width),
                        KINDS[kind][1])


def torchvision_boxes(kind: str, size: tuple[int, int], n: int, seed: int) -> torch.Tensor:
    """[n, 4] from torchvision's get_params (global RNG, seeded in a fork so the test leaves it as it was)."""
    scale, aspect, _ = KINDS[kind]
    image = torch.empty(3, *size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.tensor([RandomResizedCrop.get_params(image, list(scale), list(aspect)) for _ in range(n)])


def chi_square_p(a: torch.Tensor, b: torch.Tensor, min_count: int = 20) -> float:
    """p-value of a chi-square test that integer samples `a` and `b` come from one distribution.

    Categories are the distinct values, in order, adjacent ones pooled until each pooled bin holds at least
    `min_count` draws of both samples together (so that every expected count is large enough)."""
    values, inverse = torch.unique(torch.cat([a, b]), return_inverse=True)
    counts = torch.zeros(2, len(values), dtype=torch.float64)
    counts[0].index_add_(0, inverse[:len(a)], torch.ones(len(a), dtype=torch.float64))
    counts[1].index_add_(0, inverse[len(a):], torch.ones(len(b), dtype=torch.float64))
    totals = counts.sum(dim=0).cumsum(0)
    bins = torch.div(totals - 1, min_count, rounding_mode="floor").long()
    bins = bins.clamp(max=max(int(bins[-1]) - 1, 0))  # the last partial bin joins the one before
    bins = torch.unique_consecutive(bins, return_inverse=True)[1]  # numbered without gaps
    pooled = torch.zeros(2, int(bins.max()) + 1, dtype=torch.float64).index_add_(1, bins, counts)
    if pooled.shape[1] == 1:
        return 1.0  # a single category: nothing can differ
    expected = pooled.sum(dim=1, keepdim=True) * pooled.sum(dim=0, keepdim=True) / pooled.sum()
    statistic = ((pooled - expected) ** 2 / expected).sum()
    dof = pooled.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def box_p_values(ours: torch.Tensor, theirs: torch.Tensor, size: tuple[int, int]) -> dict[str, float]:
    """p-values of the box height, width, top, left, (height, width) jointly, and of the shares of boxes at an
    edge of their free range vertically and horizontally (where rounded positions put half the mass)."""
    def edges(boxes, axis):
        position, free = boxes[:, axis], size[axis] - boxes[:, 2 + axis]
        return ((position == 0) | (position == free)).long()

    top, left, height, width = ours.T
    their_top, their_left, their_height, their_width = theirs.T
    return {"height": chi_square_p(height, their_height), "width": chi_square_p(width, their_width),
            "top": chi_square_p(top, their_top), "left": chi_square_p(left, their_left),
            "size": chi_square_p(height * 100_000 + width, their_height * 100_000 + their_width),
            "top_edge": chi_square_p(edges(ours, 0), edges(theirs, 0)),
            "left_edge": chi_square_p(edges(ours, 1), edges(theirs, 1))}


@pytest.mark.parametrize("kind,size", CASES)
def test_boxes_are_distributed_as_torchvision_draws_them(kind, size):
    ours = project_boxes(kind, size, SAMPLES, seed=CASES.index((kind, size)))
    theirs = torchvision_boxes(kind, size, SAMPLES, seed=17)
    height, width = size
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    p_values = box_p_values(ours, theirs, size)
    assert min(p_values.values()) >= P_DIFFERENT, p_values


@pytest.mark.parametrize("kind,size", [("global", (256, 128)), ("global", (128, 64)), ("person", (60, 90))])
def test_the_test_passes_torchvision_against_itself_and_fails_rounded_positions(kind, size):
    """Self-check: two torchvision samples do not differ at P_DIFFERENT; boxes of the right sizes placed by the
    rule spec v3 replaced, top = round(u * (H - h)) (edge positions half as likely), do."""
    first, second = torchvision_boxes(kind, size, SAMPLES, seed=1), torchvision_boxes(kind, size, SAMPLES, seed=2)
    assert min(box_p_values(first, second, size).values()) >= P_DIFFERENT
    blocks = project_blocks(kind, SAMPLES, seed=3)
    ours = V.crop_boxes(blocks, torch.full((SAMPLES,), size[0]), torch.full((SAMPLES,), size[1]), KINDS[kind][1])
    free = torch.tensor(size)[None] - ours[:, 2:]
    drawn = V.crop_tries(blocks, torch.full((SAMPLES,), size[0]), torch.full((SAMPLES,), size[1]))[0] >= 0
    rounded = ours.clone()  # positions of drawn boxes by the old rule (a fallback box is centred either way)
    fields = V.CropFields.of(blocks)
    positions = torch.stack([fields.pos_y, fields.pos_x], dim=1)
    rounded[drawn, :2] = torch.round(positions[drawn].double() * free[drawn]).long()
    assert min(box_p_values(ours, first, size).values()) >= P_DIFFERENT
    p_values = box_p_values(rounded, first, size)
    assert min(p_values["top_edge"], p_values["left_edge"]) < P_DIFFERENT, p_values


def test_fallback_is_torchvisions_centre_crop_when_no_try_fits():
    """A 10x100 source: every global-view try is at least 37 pixels high, none fits, all ten are tried and
    the box is the centre crop of aspect 0.6 (the image's 10, clamped), exactly as torchvision returns it."""
    blocks = project_blocks("global", 200, seed=4)
    heights, widths = torch.full((200,), 10), torch.full((200,), 100)
    taken, tries_h, _ = V.crop_tries(blocks, heights, widths)
    assert (taken == -1).all() and (tries_h > 10).all()
    expected = torch.tensor(RandomResizedCrop.get_params(torch.empty(3, 10, 100), [0.8, 1.0], [0.4, 0.6]))
    assert expected.tolist() == [0, 47, 10, 6]
    assert (V.crop_boxes(blocks, heights, widths, CFG.person_aspect) == expected).all()
    # A portrait source too narrow for the range: the full width, height = round(width / 0.4).
    tall = V.crop_boxes(blocks, torch.full((200,), 300), torch.full((200,), 5), CFG.person_aspect)
    assert (tall == torch.tensor(RandomResizedCrop.get_params(torch.empty(3, 300, 5), [0.8, 1.0], [0.4, 0.6]))).all()
    assert tall[0].tolist() == [144, 0, 12, 5]


def constant_blocks(tries: list[tuple[float, float]], n: int = 64) -> torch.Tensor:
    """Crop blocks whose tries are the given (scale, aspect) pairs, then repeat the last; random positions."""
    tries = tries + [tries[-1]] * (V.CROP_TRIES - len(tries))
    blocks = project_blocks("global", n, seed=5).clone()
    fields = V.CropFields.of(blocks)
    fields.scales[:] = torch.tensor([scale for scale, _ in tries])
    fields.aspects[:] = torch.tensor([aspect for _, aspect in tries])
    return blocks


def test_fit_boundary_and_rounding_as_torchvision():
    """A try that is exactly the image fits; one pixel wider does not and the next try is taken. The sizes
    round half to even as Python's round (sqrt(25 * 0.25) = 2.5 -> 2). torchvision with a single-value
    range draws the same size every time, so its boxes are compared exactly."""
    heights, widths = torch.full((64,), 100), torch.full((64,), 50)
    exact = constant_blocks([(1.0, 0.5)])
    taken, _, _ = V.crop_tries(exact, heights, widths)
    assert (taken == 0).all()
    assert (V.crop_boxes(exact, heights, widths, CFG.person_aspect) == torch.tensor([0, 0, 100, 50])).all()
    assert RandomResizedCrop.get_params(torch.empty(3, 100, 50), [1.0, 1.0], [0.5, 0.5]) == (0, 0, 100, 50)
    over = constant_blocks([(1.0, 0.52), (1.0, 0.52), (0.81, 0.5)])  # w = round(sqrt(5000 * 0.52)) = 51 > 50
    taken, tries_h, tries_w = V.crop_tries(over, heights, widths)
    assert (taken == 2).all() and tries_w[0, :2].tolist() == [51.0, 51.0]
    boxes = V.crop_boxes(over, heights, widths, CFG.person_aspect)
    assert (boxes[:, 2:] == torch.tensor([90, 45])).all()
    assert set(boxes[:, 0].tolist()) == set(range(11)) and set(boxes[:, 1].tolist()) == set(range(6))
    half = constant_blocks([(0.25, 1.0)])
    boxes = V.crop_boxes(half, torch.full((64,), 5), torch.full((64,), 5), (1.0, 1.0))
    torchvision_size = RandomResizedCrop.get_params(torch.empty(3, 5, 5), [0.25, 0.25], [1.0, 1.0])[2:]
    assert torchvision_size == (2, 2) and (boxes[:, 2:] == 2).all()
    assert set(boxes[:, 0].tolist()) == set(range(4))  # top in {0, ..., 5 - 2}, each reached


def test_boxes_of_mixed_sources_resolve_each_on_its_own_size():
    """One call with sources of several sizes gives each crop the box its own size gives alone; which try is
    taken depends on that size (the sampler never sees it)."""
    blocks = project_blocks("global", 600, seed=6)
    sizes = torch.tensor([(256, 128), (90, 60), (10, 100)]).repeat(200, 1)
    mixed = V.crop_boxes(blocks, sizes[:, 0], sizes[:, 1], CFG.person_aspect)
    taken = V.crop_tries(blocks, sizes[:, 0], sizes[:, 1])[0]
    fallback_share = []
    for size in sizes[:3]:
        mine = (sizes == size).all(dim=1)
        alone = V.crop_boxes(blocks[mine], sizes[mine, 0], sizes[mine, 1], CFG.person_aspect)
        assert torch.equal(mixed[mine], alone)
        fallback_share.append(float((taken[mine] == -1).float().mean()))
    assert fallback_share[0] < 0.01 < fallback_share[1] < 0.99 and fallback_share[2] == 1.0
