"""The online baseline and the cache share one teacher side (`formats.teacher_side`): on the same view sets,
images and teacher, the targets the online step trains on are, bit for bit, what the store holds."""
from __future__ import annotations

import pytest
import torch

from cache_teacher.run import RunConfig, cached_views, run
from dpal.teachers import load_teacher
from formats.images import ImageFile
from formats.store import open_store
from formats.schema import VIEW_PARAMS_ARRAY
from formats.targets import encode_targets
from formats.teacher_side import BackgroundPool
from formats.view_records import local_crop_params
from train_student.data import FeedBatch
from train_student.prefetch import render_batch
from train_student.step import OnlineTeacher
from helpers import TEACHERS_WITH_TINY, TINY, write_packed_inputs

NUM_IMAGES, SEED = 4, 11


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_packed_inputs(tmp_path_factory.mktemp("teacher_side"), persons=NUM_IMAGES, backgrounds=3, seed=5,
                               workers=1, teacher_spec=TINY)


@pytest.mark.parametrize("target_format", ["float16", "int8"])
def test_online_baseline_trains_on_what_the_cache_stores(inputs, tmp_path, target_format):
    # One view set per image (the records the online baseline calibrates on) and one teacher batch for all of
    # them, as the online step below takes them: GEMM rounding depends on the batch shape.
    cfg = RunConfig(teacher=TINY.name, weights=str(inputs / "tiny.pth"), images=str(inputs / "persons.beton"),
                    backgrounds=str(inputs / "backgrounds.beton"), views_per_image=1, out=str(tmp_path / "s.zarr"),
                    target_format=target_format, seed=SEED, batch_size=NUM_IMAGES, calibration_images=NUM_IMAGES,
                    progress=False)
    run(cfg, teachers=TEACHERS_WITH_TINY)
    store = open_store(cfg.out)
    views_cfg, cpu = cached_views(TINY.name), torch.device("cpu")
    backgrounds = BackgroundPool(cfg.backgrounds)
    online = OnlineTeacher.calibrated(load_teacher(TINY, cfg.weights), cfg.images, backgrounds, views_cfg, cpu,
                                      count=NUM_IMAGES, seed=SEED, batch=NUM_IMAGES)
    assert online.mask_calibration.to_dict() == store.attrs["mask_calibration"]

    stored = {name: torch.from_numpy(array[:, 0]) for name, array in store.read_images(0, NUM_IMAGES).items()}
    params, images = stored[VIEW_PARAMS_ARRAY], ImageFile(cfg.images)
    batch = FeedBatch(indices=torch.arange(NUM_IMAGES),
                      images=[torch.from_numpy(images.image(i)) for i in range(NUM_IMAGES)],
                      backgrounds=backgrounds.used_by(params), view_params=params,
                      local_params=local_crop_params(SEED, 0, 0, NUM_IMAGES, views_cfg))
    targets = online.targets(render_batch(batch, views_cfg, cpu), online.stage(batch, cpu))

    recoded = encode_targets(global_=targets["global_target"], local=targets["local_target"],
                             mask=targets["local_mask"], relation=targets["relation_target"],
                             target_format=target_format).arrays()
    assert set(recoded) | {VIEW_PARAMS_ARRAY} == set(stored)
    for name, value in recoded.items():
        assert torch.equal(value, stored[name]), name
    # Decoded, the store gives back the online float32 targets at its own precision.
    decoded = store.targets({name: array.numpy() for name, array in stored.items()}).decoded()
    if target_format == "float16":
        for field, value in decoded.loss_arguments().items():
            assert torch.equal(value, targets[field].half().float()), field


def test_a_pool_too_large_to_keep_keeps_its_most_recently_used_backgrounds(inputs):
    whole = BackgroundPool(inputs / "backgrounds.beton")
    first = whole[0]
    assert all(whole[i] is whole[i] for i in range(len(whole))) and whole[0] is first  # all kept
    recent = BackgroundPool(inputs / "backgrounds.beton", cache_bytes=0, recent_images=2)
    first, _ = recent[0], recent[1]
    assert recent[0] is first  # used again: 1 is now the least recently used
    third = recent[2]  # 1 dropped for it
    assert recent[0] is first and recent[2] is third
    second = recent[1]  # decoded again; 0, the least recently used now, dropped for it
    assert recent[1] is second and recent[0] is not first and torch.equal(recent[0], first)
    assert all(torch.equal(recent[i], whole[i]) for i in range(len(whole)))
