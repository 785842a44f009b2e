"""The pixel reference of dpal.views: a few view sets and local crops, rendered once and kept as a file.

    PYTHONPATH=. python tests/view_reference.py     # writes tests/data/view_reference_v{VIEW_PARAMS_VERSION}.npz

The file holds its inputs (small uint8 images, the view records) and what the renderer made of them: the
integer crop boxes of every crop kind, exact on any machine, and the normalized pixels, which other CPUs and
GPUs reproduce up to float rounding. Regenerate it only together with a deliberate change of the views (and a
new VIEW_PARAMS_VERSION when stored records render differently); the file of the previous version stays as the
record of what changed and of records this code must refuse.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"
# Persons: person-like, wide, tall, tiny; backgrounds: square-ish, wide, small. Noise content: every colour op
# and the blur have something to act on, and integer draws make the images the same on every machine.
PERSON_SIZES = ((48, 20), (14, 40), (60, 17), (9, 6))
BACKGROUND_SIZES = ((40, 56), (20, 64), (12, 12))
SEED = 2026


def reference_path(version: int) -> Path:
    return DATA / f"view_reference_v{version}.npz"


def small_config():
    """The view sizes of the reference (the test suite's small views; every code path of the real sizes)."""
    from dpal.config import ViewConfig

    return ViewConfig(global_size=(32, 16), local_size=(16, 12), crowd_size=(32, 32), paste_y=(0, 14),
                      first_person_x=(0, 6), second_person_x_max=20)


def reference_inputs(views) -> dict[str, np.ndarray]:
    """Images and records of the reference, drawn from SEED with ``views`` (a version of dpal.views)."""
    generator = torch.Generator().manual_seed(SEED)
    persons = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator) for h, w in PERSON_SIZES]
    pool = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator) for h, w in BACKGROUND_SIZES]
    cfg = small_config()
    records = views.sample_view_sets(generator, len(persons), num_backgrounds=len(pool), cfg=cfg)
    local_records = views.sample_local_crops(generator, len(persons), cfg)
    arrays = {f"person_{i}": image.numpy() for i, image in enumerate(persons)}
    arrays |= {f"background_{i}": image.numpy() for i, image in enumerate(pool)}
    return arrays | {"records": records.numpy(), "local_records": local_records.numpy()}


def render_reference(views, arrays: dict[str, np.ndarray], device="cpu") -> dict[str, np.ndarray]:
    """Boxes and normalized pixels that ``views`` makes of the reference inputs."""
    cfg = small_config()
    persons = [torch.from_numpy(arrays[f"person_{i}"]) for i in range(len(PERSON_SIZES))]
    pool = [torch.from_numpy(arrays[f"background_{i}"]) for i in range(len(BACKGROUND_SIZES))]
    records, local_records = torch.from_numpy(arrays["records"]), torch.from_numpy(arrays["local_records"])
    backgrounds = [pool[i] for i in views.background_indices(records).tolist()]
    heights, widths = (torch.tensor([image.shape[axis] for image in persons]) for axis in (0, 1))
    bg_heights, bg_widths = (torch.tensor([image.shape[axis] for image in backgrounds]) for axis in (0, 1))
    local_blocks = local_records.reshape(-1, local_records.shape[-1])[:, views.LOCAL_CROP_BLOCK]
    fields = views.ViewSetFields.of(records)
    per_local = local_records.shape[1]
    boxes = {
        "global_boxes": views.crop_boxes(fields.global_view, heights, widths, cfg.person_aspect),
        "person_boxes": views.crop_boxes(fields.person, heights, widths, cfg.person_aspect),
        "background_boxes": views.crop_boxes(fields.background, bg_heights, bg_widths, cfg.background_aspect),
        "local_boxes": views.crop_boxes(local_blocks, heights.repeat_interleave(per_local),
                                        widths.repeat_interleave(per_local), cfg.person_aspect),
    }
    rendered = views.render_view_sets(persons, pool, records, cfg, device)
    local_crops = views.render_local_crops(persons, local_records, cfg, device)
    return {name: box.numpy() for name, box in boxes.items()} | {
        "global_view": rendered.global_view.cpu().numpy(), "crowd": rendered.crowd.cpu().numpy(),
        "local_crops": local_crops.cpu().numpy()}


def write_reference() -> Path:
    from dpal import views

    arrays = reference_inputs(views)
    arrays |= render_reference(views, arrays)
    path = reference_path(views.VIEW_PARAMS_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, version=np.int64(views.VIEW_PARAMS_VERSION), **arrays)
    return path


if __name__ == "__main__":
    sys.exit(print(f"wrote {write_reference()}"))
