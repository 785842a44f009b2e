"""dpal.views against torchvision.transforms.v2.functional, op by op and composed, plus sampling and errors."""
import itertools
import json
import math
import re
import threading

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.transforms import InterpolationMode

import view_reference
from dpal import views as V
from dpal.config import ViewConfig
from helpers import SMALL, random_image, random_images

# Small output sizes keep the tests fast on CPU; every code path is the one used at 256x128.
# torchvision resizes with PyTorch's sparse separable kernel, we with dense float32 matmuls: the sums
# run in another order (and PyTorch upsampling weights are float32), so pixels differ by a few ulps.
RESIZE_TOL = 1e-5
# Composed pipelines: the hue op (rgb -> hsv -> rgb) can amplify such differences by a few times.
PIPELINE_TOL = 5e-5


def to_float(image):
    return TF.to_dtype(image.permute(2, 0, 1), torch.float32, scale=True)


def reference_crop(image, block, out_size, aspect_range, cfg):
    """The crop as torchvision composes it from the same parameters (float path)."""
    block = block.double()
    fields = V.CropFields.of(block)
    top, left, h, w = V.crop_boxes(block[None], torch.tensor([image.shape[0]]), torch.tensor([image.shape[1]]),
                                   aspect_range)[0]
    x = TF.resized_crop(to_float(image), int(top), int(left), int(h), int(w), list(out_size),
                        interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    if fields.flip > 0.5:
        x = TF.horizontal_flip(x)
    if fields.jitter > 0.5:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op_id in fields.order.long().tolist():
            x = ops[op_id](x, float(fields.factors[op_id]))
    if fields.gray > 0.5:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if fields.blur_sigma > 0:
        k = V.blur_kernel_size(cfg)
        x = TF.gaussian_blur(x, [k, k], [float(fields.blur_sigma)] * 2)
    if fields.solarize > 0.5:
        x = TF.solarize(x, cfg.solarize_threshold / 255)
    return x


def crop_blocks(n, scale, aspect, pos_y, pos_x):
    """``n`` crop blocks whose every try is (scale, aspect), at the given position uniforms, with no colour op
    (neutral factors, jitter order 0..3): callers set the ops they test."""
    blocks = torch.zeros(n, V.CROP_BLOCK_FIELDS, dtype=torch.float64)
    fields = V.CropFields.of(blocks)  # views: writing a field writes the blocks
    fields.scales[:] = torch.as_tensor(scale, dtype=torch.float64).reshape(-1, 1)
    fields.aspects[:] = torch.as_tensor(aspect, dtype=torch.float64).reshape(-1, 1)
    fields.pos_y[:] = torch.as_tensor(pos_y, dtype=torch.float64)
    fields.pos_x[:] = torch.as_tensor(pos_x, dtype=torch.float64)
    fields.factors[:] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    fields.order[:] = torch.arange(4.0)
    return blocks


def reference_view_set(image, background, record, cfg):
    record = V.ViewSetFields.of(record.double())
    global_view = reference_crop(image, record.global_view, cfg.global_size, cfg.person_aspect, cfg)
    canvas = reference_crop(background, record.background, cfg.crowd_size, cfg.background_aspect,
                            cfg).clone()
    first = reference_crop(image, record.person, cfg.local_size, cfg.person_aspect, cfg)
    second = TF.resize(global_view, list(cfg.local_size), interpolation=InterpolationMode.BICUBIC,
                       antialias=True).clamp(0, 1)
    (ph, pw), alpha = cfg.local_size, cfg.person_alpha
    for person, (y, x) in ((first, record.paste[:2]), (second, record.paste[2:])):
        y, x = int(y), int(x)
        region = canvas[:, y:y + ph, x:x + pw]
        canvas[:, y:y + ph, x:x + pw] = person * alpha + region * (1 - alpha)
    return (TF.normalize(global_view, list(cfg.mean), list(cfg.std)),
            TF.normalize(canvas, list(cfg.mean), list(cfg.std)))


# ------------------------------------------------------------------------------------ record layout

def test_record_layout_is_documented_in_order():
    assert V.VIEW_SET_FIELDS == len(V.VIEW_SET_FIELD_NAMES) == 111
    assert V.LOCAL_CROP_FIELDS == len(V.LOCAL_CROP_FIELD_NAMES) == 36
    doc = V.records.__doc__
    assert f"``VIEW_SET_FIELDS`` = 111 float32, {111 * 4} bytes" in doc
    assert f"``LOCAL_CROP_FIELDS`` = 36, {36 * 4} bytes" in doc
    assert len(set(V.VIEW_SET_FIELD_NAMES)) == V.VIEW_SET_FIELDS
    block_rows = []
    for offset, name in re.findall(r"^\s*(\d+(?:\+k)?)\s+(\w+)\s", doc.split("A *view set* record")[0], flags=re.M):
        if offset.endswith("+k"):  # one row stands for the ten RandomResizedCrop tries
            block_rows += [(int(offset[:-2]) + k, name.replace("_k", f"_{k}")) for k in range(10)]
        else:
            block_rows.append((int(offset), name))
    assert block_rows == list(enumerate(V.CROP_BLOCK_NAMES))
    for index, name in enumerate(V.VIEW_SET_FIELD_NAMES):
        if "." not in name:
            assert re.search(rf"^\s+{index}\s+{name}\s", doc, flags=re.M), name


def test_named_fields_cover_every_field_once_in_table_order():
    """The offsets come from the name tables: read through the named views, a record numbered 0, 1, 2, ...
    gives back every offset once, in the order of its field names."""
    def flat(fields):
        return torch.cat([field.reshape(-1) for field in fields]).tolist()

    assert flat(V.CropFields.of(torch.arange(float(V.CROP_BLOCK_FIELDS)))) == list(range(V.CROP_BLOCK_FIELDS))
    view_set = V.ViewSetFields.of(torch.arange(float(V.VIEW_SET_FIELDS)))
    assert flat(view_set) == list(range(V.VIEW_SET_FIELDS))
    assert V.VIEW_SET_FIELD_NAMES[int(view_set.background_index)] == "background_index"
    assert [V.VIEW_SET_FIELD_NAMES[int(i)] for i in view_set.paste] == ["paste_y1", "paste_x1", "paste_y2", "paste_x2"]
    assert V.LOCAL_CROP_FIELD_NAMES[V.LOCAL_CROP_BLOCK] == V.CROP_BLOCK_NAMES


# ----------------------------------------------------------------------------------------- sampling

def test_sampling_is_seeded():
    a = V.sample_view_sets(torch.Generator().manual_seed(3), 16, num_backgrounds=5)
    b = V.sample_view_sets(torch.Generator().manual_seed(3), 16, num_backgrounds=5)
    c = V.sample_view_sets(torch.Generator().manual_seed(4), 16, num_backgrounds=5)
    assert a.dtype == torch.float32 and a.shape == (16, V.VIEW_SET_FIELDS)
    assert torch.equal(a, b) and not torch.equal(a, c)
    la = V.sample_local_crops(torch.Generator().manual_seed(3), 16)
    assert torch.equal(la, V.sample_local_crops(torch.Generator().manual_seed(3), 16))
    assert la.shape == (16, 2, V.LOCAL_CROP_FIELDS)


def check_blocks(blocks, cfg, *, scale, aspect, blur_p, solarize_p):
    n = len(blocks)
    tol = 4 / math.sqrt(n)  # ~8 standard deviations of a frequency estimate
    fields = V.CropFields.of(blocks)
    scales, aspects = fields.scales, fields.aspects
    assert scales.shape[1] == aspects.shape[1] == V.CROP_TRIES == 10
    assert scales.min() >= scale[0] and scales.max() <= scale[1]
    assert aspects.min() >= aspect[0] - 1e-6 and aspects.max() <= aspect[1] + 1e-6
    assert (scales[:, 0] != scales[:, 1]).all()  # every try is a draw of its own
    log_aspect = (aspects.double().log() - math.log(aspect[0])) / (math.log(aspect[1]) - math.log(aspect[0]))
    assert abs(log_aspect.mean() - 0.5) < tol and abs(((scales - scale[0]) / (scale[1] - scale[0])).mean() - 0.5) < tol
    fields = fields
    positions = torch.stack([fields.pos_y, fields.pos_x], dim=1).double()
    assert positions.min() >= 0 and positions.max() < 1
    assert torch.equal(positions * 2**24, (positions * 2**24).floor())  # on the 2**-24 grid
    assert abs(fields.flip.mean() - cfg.flip_p) < tol
    jitter = fields.jitter > 0.5
    assert abs(jitter.float().mean() - cfg.jitter_p) < tol
    b, c, s, h = cfg.jitter
    factors = fields.factors
    for column, (low, high) in enumerate([(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)]):
        values = factors[jitter, column]
        assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6
        assert values.max() - values.min() > 0.9 * (high - low)
    assert torch.equal(factors[~jitter], torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(int((~jitter).sum()), 4))
    order = fields.order
    assert torch.equal(order.sort(dim=1).values, torch.arange(4.0).expand(n, 4))
    assert len({tuple(row) for row in order.tolist()}) == 24  # every order occurs
    assert abs(fields.gray.mean() - cfg.gray_p) < tol
    sigma = fields.blur_sigma
    blurred = sigma > 0
    assert abs(blurred.float().mean() - blur_p) < tol
    if blurred.any():
        assert sigma[blurred].min() >= cfg.blur_sigma[0] and sigma[blurred].max() <= cfg.blur_sigma[1]
    assert abs(fields.solarize.mean() - solarize_p) < tol


def test_sampled_decisions_follow_the_spec():
    cfg = ViewConfig()
    records = V.sample_view_sets(torch.Generator().manual_seed(0), 4000, num_backgrounds=7, cfg=cfg)
    fields = V.ViewSetFields.of(records)
    assert (fields.version == V.VIEW_PARAMS_VERSION).all()
    check_blocks(fields.global_view, cfg, scale=cfg.global_scale, aspect=cfg.person_aspect, blur_p=1.0,
                 solarize_p=0.0)
    check_blocks(fields.background, cfg, scale=cfg.background_scale, aspect=cfg.background_aspect,
                 blur_p=0.1, solarize_p=0.2)
    check_blocks(fields.person, cfg, scale=cfg.local_scale, aspect=cfg.person_aspect, blur_p=0.5,
                 solarize_p=0.0)
    index = V.background_indices(records)
    assert index.dtype == torch.int64 and set(index.tolist()) == set(range(7))
    y1, x1, y2, x2 = fields.paste.T
    for y in (y1, y2):
        assert y.min() == 0 and y.max() == 126 and torch.equal(y, y.round())
    assert x1.min() == 0 and x1.max() == 62
    assert (x2 >= x1 + 96).all() and x2.max() == 158
    locals_ = V.sample_local_crops(torch.Generator().manual_seed(1), 2000, cfg)
    assert (locals_[..., 0] == V.VIEW_PARAMS_VERSION).all()
    check_blocks(locals_.reshape(-1, V.LOCAL_CROP_FIELDS)[:, 1:], cfg, scale=cfg.local_scale, aspect=cfg.person_aspect,
                 blur_p=0.5, solarize_p=0.0)


# --------------------------------------------------------------------------- ops vs torchvision

@pytest.mark.parametrize("size,out,flip", [((300, 150), (256, 128), False), ((61, 37), (128, 96), True),
                                           ((90, 160), (64, 64), False), ((17, 9), (16, 12), True)])
def test_resized_crop_matches_torchvision(size, out, flip):
    """Downsampling (antialiased) and upsampling, odd sizes, crops padded inside a larger batch."""
    generator = torch.Generator().manual_seed(sum(size))
    images = [random_image(generator, *size), random_image(generator, size[0] + 13, size[1] + 7)]
    blocks = crop_blocks(2, [0.6, 0.9], [0.5, 0.45], [0.3, 0.5], [0.8, 0.5])
    V.CropFields.of(blocks).flip[:] = float(flip)
    aspects = ViewConfig().person_aspect
    ours = V.render_crops(images, blocks, out, aspects, ViewConfig(), torch.device("cpu"))
    for i, image in enumerate(images):
        expected = reference_crop(image, blocks[i], out, aspects, ViewConfig())
        assert (ours[i] - expected).abs().max() < RESIZE_TOL


def test_colour_ops_match_torchvision_per_sample():
    generator = torch.Generator().manual_seed(0)
    x = torch.stack([to_float(random_image(generator, 24, 20)) for _ in range(6)])
    factor = torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4, 0.95])
    shift = torch.tensor([-0.1, -0.05, 0.0, 0.03, 0.1, 0.5 - 1e-3])
    for ours, theirs, values in ((V.adjust_brightness, TF.adjust_brightness, factor),
                                 (V.adjust_contrast, TF.adjust_contrast, factor),
                                 (V.adjust_saturation, TF.adjust_saturation, factor),
                                 (V.adjust_hue, TF.adjust_hue, shift)):
        expected = torch.stack([theirs(x[i], float(values[i])) for i in range(6)])
        assert (ours(x, values) - expected).abs().max() <= 1e-6, ours.__name__
    assert torch.equal(V.grayscale(x).expand_as(x), TF.rgb_to_grayscale(x, num_output_channels=3))
    assert torch.equal(V.solarize(x, 128 / 255), TF.solarize(x, 128 / 255))
    cfg = ViewConfig()
    assert torch.allclose(V.normalize(x), TF.normalize(x, list(cfg.mean), list(cfg.std)), atol=1e-6)
    assert torch.allclose(V.denormalize(V.normalize(x)), x, atol=1e-6)


def test_gaussian_blur_with_per_sample_sigma_matches_torchvision():
    generator = torch.Generator().manual_seed(1)
    x = torch.stack([to_float(random_image(generator, 30, 14)) for _ in range(4)])
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0], dtype=torch.float64)
    k = V.blur_kernel_size(ViewConfig())
    assert k == 13
    rows, cols = V.blur_weights(sigmas, 30, k), V.blur_weights(sigmas, 14, k)
    ours = V.apply_separable(x, rows, cols)
    expected = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sigmas[i])] * 2) for i in range(4)])
    assert (ours - expected).abs().max() < 1e-6


def test_every_jitter_order_matches_torchvision(monkeypatch):
    """All 24 op orders, with flip, grayscale, blur and solarize mixed in, against a per-sample composition."""
    monkeypatch.setattr(V.render, "_RESIZE_GROUP", 5)  # several size groups, the last one partial
    generator = torch.Generator().manual_seed(2)
    images = [random_image(generator, 40 + i, 25 + i % 7) for i in range(24)]
    blocks = crop_blocks(24, 0.7, 0.5, 0.4, 0.6)
    fields = V.CropFields.of(blocks)
    fields.flip[:] = torch.arange(24) % 2
    fields.jitter[:] = 1.0
    fields.factors[:] = torch.tensor([1.3, 0.7, 1.2, 0.08])
    fields.order[:] = torch.tensor(list(itertools.permutations(range(4))), dtype=torch.float64)
    fields.gray[:] = (torch.arange(24) % 5 == 0).double()
    fields.blur_sigma[:] = torch.where(torch.arange(24) % 3 == 0, 1.1, 0.0)
    fields.solarize[:] = (torch.arange(24) % 4 == 1).double()
    aspects = ViewConfig().person_aspect
    ours = V.render_crops(images, blocks, (20, 16), aspects, ViewConfig(), torch.device("cpu"))
    for i, image in enumerate(images):
        expected = reference_crop(image, blocks[i], (20, 16), aspects, ViewConfig())
        assert (ours[i] - expected).abs().max() < PIPELINE_TOL, i
    # The order matters: brightness-then-contrast is not contrast-then-brightness.
    assert (ours[0] - ours[6]).abs().max() > 1e-3


def test_view_sets_match_torchvision_reference(monkeypatch):
    monkeypatch.setattr(V.render, "_RESIZE_GROUP", 4)
    images, backgrounds = random_images(0, 6), random_images(1, 6, 30, 120)
    records = V.sample_view_sets(torch.Generator().manual_seed(7), 6, num_backgrounds=6, cfg=SMALL)
    pool_index = V.background_indices(records)
    chosen = [backgrounds[i] for i in pool_index.tolist()]
    views = V.render_view_sets(images, backgrounds, records, SMALL)
    assert views.global_view.shape == (6, 3, 32, 16) and views.crowd.shape == (6, 3, 32, 32)
    for i in range(6):
        global_view, crowd = reference_view_set(images[i], chosen[i], records[i], SMALL)
        assert (views.global_view[i] - global_view).abs().max() < PIPELINE_TOL / min(SMALL.std)
        assert (views.crowd[i] - crowd).abs().max() < PIPELINE_TOL / min(SMALL.std)


def test_default_sizes_and_local_crops():
    images, backgrounds = random_images(3, 2, 100, 200), random_images(4, 2, 100, 300)
    generator = torch.Generator().manual_seed(8)
    records = V.sample_view_sets(generator, 2, num_backgrounds=2)
    views = V.render_view_sets(images, backgrounds, records)
    assert views.global_view.shape == (2, 3, 256, 128) and views.crowd.shape == (2, 3, 256, 256)
    assert views.global_view.dtype == torch.float32
    local_records = V.sample_local_crops(generator, 2)
    crops = V.render_local_crops(images, local_records)
    assert crops.shape == (2, 2, 3, 128, 96)
    for i in range(2):
        for j in range(2):
            expected = TF.normalize(reference_crop(images[i], local_records[i, j, 1:], (128, 96),
                                                   ViewConfig().person_aspect, ViewConfig()),
                                    list(ViewConfig().mean), list(ViewConfig().std))
            assert (crops[i, j] - expected).abs().max() < PIPELINE_TOL / min(ViewConfig().std)


# -------------------------------------------------------------------------------------- exactness

def test_same_parameters_give_bit_identical_pixels():
    images, backgrounds = random_images(5, 5), random_images(6, 5, 30, 120)
    records = V.sample_view_sets(torch.Generator().manual_seed(9), 5, num_backgrounds=5, cfg=SMALL)
    first = V.render_view_sets(images, backgrounds, records, SMALL)
    again = V.render_view_sets([im.clone() for im in images], backgrounds, records.clone(), SMALL)
    assert torch.equal(first.global_view, again.global_view) and torch.equal(first.crowd, again.crowd)
    # Other batch-mates change padding and matmul blocking only: far below one grey level.
    alone = V.render_view_sets(images[2:3], backgrounds, records[2:3], SMALL)
    assert (alone.global_view[0] - first.global_view[2]).abs().max() < 1e-5
    assert (alone.crowd[0] - first.crowd[2]).abs().max() < 1e-5


PIXEL_TOL = {"cpu": 1e-5, "cuda": 1 / 255}  # in [0, 1] units: float rounding of another CPU, and CPU vs CUDA


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_views_match_the_pixel_reference_file(device):
    """The sampler still draws the reference's records from its seed, every crop kind (global, background,
    first person, local) resolves to the reference's integer boxes exactly, and the rendered pixels are the
    reference's up to float rounding (tests/view_reference.py wrote the file; it changes only on purpose)."""
    reference = np.load(view_reference.reference_path(V.VIEW_PARAMS_VERSION))
    assert int(reference["version"]) == V.VIEW_PARAMS_VERSION
    inputs = view_reference.reference_inputs(V)
    for name, array in inputs.items():
        assert np.array_equal(array, reference[name]), name
    rendered = view_reference.render_reference(V, inputs, device)
    for name in ("global_boxes", "person_boxes", "background_boxes", "local_boxes"):
        assert np.array_equal(rendered[name], reference[name]), name
    for name in ("global_view", "crowd", "local_crops"):
        assert np.abs(rendered[name] - reference[name]).max() <= PIXEL_TOL[device] / min(SMALL.std), name


def test_the_previous_reference_shows_what_changed_and_its_records_are_refused():
    """The version 1 reference (boxes shrunk to fit, rounded positions) is kept as the record of the change:
    its images are this reference's, its boxes are not, and this code refuses its records in one line."""
    old = np.load(view_reference.reference_path(1))
    new = np.load(view_reference.reference_path(V.VIEW_PARAMS_VERSION))
    for i in range(len(view_reference.PERSON_SIZES)):
        assert np.array_equal(old[f"person_{i}"], new[f"person_{i}"])
    assert not np.array_equal(old["global_boxes"], new["global_boxes"])
    for records, fields, what in ((old["records"], V.VIEW_SET_FIELDS, "view set"),
                                  (old["local_records"], V.LOCAL_CROP_FIELDS, "local crop")):
        with pytest.raises(V.ViewParamsError) as error:
            V.check_view_params(torch.from_numpy(records), fields, what)
        message = str(error.value)
        assert "\n" not in message and "record version [1.0]" in message
        assert "shrunk instead of redrawn" in message and "rebuild it with `python -m cache_teacher run`" in message


def test_planned_on_another_thread_then_executed_on_the_device():
    """A prefetcher's split: pack + plan on a worker thread (host only), move, execute later; the pixels
    are those of render_view_sets / render_local_crops. The device half also runs on the meta device,
    whose tensors hold no data: so it never reads a device value back to the host (no sync)."""
    images, pool = random_images(20, 5), random_images(21, 3, 30, 120)
    generator = torch.Generator().manual_seed(22)
    records = V.sample_view_sets(generator, 5, num_backgrounds=3, cfg=SMALL)
    local_records = V.sample_local_crops(generator, 5, SMALL)
    prepared = {}

    def prepare():
        packed, persons, backgrounds = V.pack_view_set_images(images, pool, records)
        prepared["packed"], prepared["persons"] = packed, persons
        prepared["sets"] = V.plan_view_sets(persons, backgrounds, records, SMALL)
        prepared["local"] = V.plan_local_crops(persons, local_records, SMALL)

    worker = threading.Thread(target=prepare)
    worker.start()
    worker.join()
    pixels = prepared["packed"].pixels
    views = V.execute_view_sets(pixels, prepared["sets"])
    expected = V.render_view_sets(images, pool, records, SMALL)
    assert torch.equal(views.global_view, expected.global_view) and torch.equal(views.crowd, expected.crowd)
    # A background several view sets use is packed once: the buffer holds the persons and the pool entries used.
    assert len(prepared["packed"].offsets) == 5 + len(set(V.background_indices(records).tolist()))
    assert torch.equal(V.execute_local_crops(pixels, prepared["local"]), V.render_local_crops(images, local_records, SMALL))

    meta = torch.device("meta")
    on_meta = V.execute_view_sets(pixels.to(meta), prepared["sets"].to(meta))
    assert on_meta.global_view.device == meta and on_meta.crowd.shape == expected.crowd.shape
    assert V.execute_local_crops(pixels.to(meta), prepared["local"].to(meta)).shape == (5, 2, 3, *SMALL.local_size)
    with pytest.raises(V.ViewParamsError, match="n >= 1"):
        V.plan_view_sets(prepared["packed"].select(0, 0), prepared["packed"].select(0, 0), records[:0], SMALL)
    with pytest.raises(ValueError, match="5 view set records need 5 backgrounds, got 4"):
        V.plan_view_sets(prepared["persons"], prepared["persons"].select(0, 4), records, SMALL)


class DeviceOpCounter(TorchDispatchMode):
    """Counts the aten operators a render dispatches on ``device`` (after composite ops are decomposed): one
    kernel launch or copy each on a GPU. Views and bare allocations launch nothing and are left out."""

    NO_KERNEL = {"aten._unsafe_view", "aten._reshape_alias", "aten.alias", "aten.detach", "aten.lift_fresh",
                 "aten.empty", "aten.empty_like", "aten.empty_strided"}

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.device_ops = device, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if not func.is_view and name not in self.NO_KERNEL and any(
                isinstance(t, torch.Tensor) and t.device.type == self.device.type
                for t in tree_leaves((args, kwargs, out))):
            self.device_ops[name] = self.device_ops.get(name, 0) + 1
        return out


def test_device_work_does_not_grow_with_the_samples_of_a_group():
    """The crops of a render call are packed by one gather, not one copy each: within one resize group
    (up to 32 crops) three times the samples (the same records repeated, so the same colour-op subsets
    are partial) dispatch exactly the same device operators, counted on the meta device."""
    images, pool = random_images(30, 5), random_images(31, 5, 30, 120)
    records = V.sample_view_sets(torch.Generator().manual_seed(32), 5, num_backgrounds=5, cfg=SMALL)
    local_records = V.sample_local_crops(torch.Generator().manual_seed(33), 5, SMALL)
    meta = torch.device("meta")
    counts = []
    for repeat in (1, 1, 3):  # 5 and 15 view sets, 10 and 30 local crops; the first run caches constants
        on_meta = [image.to(meta) for image in images * repeat]
        with DeviceOpCounter(meta) as counter:
            V.render_view_sets(on_meta, [image.to(meta) for image in pool], records.repeat(repeat, 1), SMALL)
            V.render_local_crops(on_meta, local_records.repeat(repeat, 1, 1), SMALL)
        counts.append(counter.device_ops)
    assert counts[1] == counts[2]


def test_any_size_and_aspect_renders():
    generator = torch.Generator().manual_seed(16)
    images = [random_image(generator, h, w) for h, w in ((6, 200), (300, 8), (3, 3), (1, 1))]
    backgrounds = [random_image(generator, h, w) for h, w in ((2, 500), (40, 1), (3, 3), (700, 30))]
    records = V.sample_view_sets(generator, 4, num_backgrounds=4, cfg=SMALL)
    views = V.render_view_sets(images, backgrounds, records, SMALL)
    crops = V.render_local_crops(images, V.sample_local_crops(generator, 4, SMALL), SMALL)
    for x in (views.global_view, views.crowd, crops):
        pixels = V.denormalize(x)
        assert torch.isfinite(x).all() and (V.normalize(pixels) - x).abs().max() < 1e-5  # within [0, 1]
    one_pixel = V.denormalize(views.global_view[3])  # a 1x1 image renders as a flat (jittered) colour
    assert (one_pixel - one_pixel[:, :1, :1]).abs().max() < 1e-5


def test_grey_and_rgba_inputs_render_like_rgb():
    rgb = random_images(10, 2)
    grey_arrays = [im[:, :, 0].numpy() for im in rgb]
    grey_as_rgb = [torch.from_numpy(g)[:, :, None].repeat(1, 1, 3) for g in grey_arrays]
    rgba = [torch.cat([im, torch.full_like(im[:, :, :1], 7)], dim=2) for im in rgb]
    records = V.sample_view_sets(torch.Generator().manual_seed(11), 2, num_backgrounds=1, cfg=SMALL)
    a = V.render_view_sets(grey_arrays, rgba, records, SMALL)
    b = V.render_view_sets(grey_as_rgb, rgb, records, SMALL)
    assert torch.equal(a.global_view, b.global_view) and torch.equal(a.crowd, b.crowd)
    assert V.to_rgb_uint8(np.zeros((4, 5, 1), np.uint8)).shape == (4, 5, 3)


@pytest.mark.cuda
def test_cuda_matches_cpu_within_one_grey_level():
    images, backgrounds = random_images(12, 8, 60, 300), random_images(13, 8, 100, 400)
    generator = torch.Generator().manual_seed(12)
    records = V.sample_view_sets(generator, 8, num_backgrounds=8)
    local_records = V.sample_local_crops(generator, 8)
    cpu = V.render_view_sets(images, backgrounds, records)
    gpu = V.render_view_sets(images, backgrounds, records, device="cuda")
    gpu_again = V.render_view_sets([im.cuda() for im in images], [b.cuda() for b in backgrounds], records)
    assert torch.equal(gpu.global_view, gpu_again.global_view) and torch.equal(gpu.crowd, gpu_again.crowd)
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # a trainer's setting must not leak into the pixels
    try:
        with_tf32 = V.render_view_sets(images, backgrounds, records, device="cuda")
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    assert torch.equal(with_tf32.global_view, gpu.global_view) and torch.equal(with_tf32.crowd, gpu.crowd)
    for ours, theirs in ((cpu.global_view, gpu.global_view), (cpu.crowd, gpu.crowd),
                         (V.render_local_crops(images, local_records),
                          V.render_local_crops(images, local_records, device="cuda"))):
        difference = (V.denormalize(ours) - V.denormalize(theirs.cpu())).abs().max()
        assert difference <= 1 / 255


# ----------------------------------------------------------------------------------------- errors

def test_bad_records_are_rejected_with_the_reason():
    images, backgrounds = random_images(14, 2), random_images(15, 2)
    records = V.sample_view_sets(torch.Generator().manual_seed(0), 2, num_backgrounds=2, cfg=SMALL)
    old = records.clone()
    old[:, 0] = 0
    with pytest.raises(V.ViewParamsError, match="version"):
        V.render_view_sets(images, backgrounds, old, SMALL)
    with pytest.raises(V.ViewParamsError, match="111"):
        V.render_view_sets(images, backgrounds, records[:, :40], SMALL)
    with pytest.raises(V.ViewParamsError, match="float32"):
        V.render_view_sets(images, backgrounds, records.double(), SMALL)
    with pytest.raises(V.ViewParamsError, match="local crop"):
        V.render_local_crops(images, records, SMALL)
    with pytest.raises(ValueError, match="background pool is empty"):
        V.render_view_sets(images, [], records, SMALL)
    with pytest.raises(ValueError, match="background pool is empty"):
        V.sample_view_sets(torch.Generator(), 2, num_backgrounds=0)
    with pytest.raises(ValueError, match=r"images\[1\].*not decoded"):
        V.render_view_sets([images[0], np.zeros((0, 0, 3), np.uint8)], backgrounds, records, SMALL)
    with pytest.raises(ValueError, match=r"images\[0\].*uint8"):
        V.render_view_sets([images[0].float(), images[1]], backgrounds, records, SMALL)
    with pytest.raises(ValueError, match="2 images"):
        V.render_view_sets(images[:1], backgrounds, records, SMALL)
    with pytest.raises(ValueError, match="names background [01], which the background pool .1 images. does not hold"):
        V.render_view_sets(images, {5: backgrounds[0]}, records, SMALL)
    with pytest.raises(ValueError, match="crowd geometry"):
        V.sample_view_sets(torch.Generator(), 2, num_backgrounds=1, cfg=ViewConfig(paste_y=(0, 200)))


# -------------------------------------------------------------------------------------------- CLI

def write_images(folder, sizes, seed):
    from PIL import Image

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(random_image(generator, h, w).numpy()).save(folder / f"{i}.png")


def test_grid_command_writes_a_picture_and_names_bad_input(tmp_path, capsys):
    from PIL import Image

    from cache_teacher.__main__ import main
    from cache_teacher.views import ImageSource, ImageSourceError

    write_images(tmp_path / "persons", [(160, 70), (120, 64)], seed=1)
    Image.fromarray(np.zeros((50, 40), np.uint8)).save(tmp_path / "persons" / "grey.png")
    write_images(tmp_path / "backgrounds", [(200, 260)], seed=2)
    out = tmp_path / "views.png"
    command = ["views", "grid", "--images", str(tmp_path / "persons"), "--backgrounds", str(tmp_path / "backgrounds"),
               "--num", "3", "--out", str(out)]
    assert main(command) == 0
    with Image.open(out) as picture:
        assert picture.mode == "RGB" and picture.height >= 3 * 256 and picture.width > 256 + 128 + 96
        header = np.asarray(picture)[:30]  # the column labels: dark text on a white strip
        assert (header < 100).any() and (header == 255).mean() > 0.8
    (tmp_path / "backgrounds" / "0.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "0.png could not be decoded" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match="holds no images.*pool is empty"):
        ImageSource(tmp_path / "empty", "--backgrounds")


def test_bench_command_prints_a_table_and_writes_json(tmp_path, capsys):
    from cache_teacher.__main__ import main

    report = tmp_path / "bench.json"
    assert main(["views", "bench", "--batch", "2", "--repeats", "1", "--devices", "cpu", "--json", str(report)]) == 0
    assert "view sets/s" in capsys.readouterr().out
    row = json.loads(report.read_text())["results"][0]
    assert row["device"] == "cpu" and row["batch"] == 2 and row["view_sets_per_s"] > 0
