"""Drawing view records: every random decision of a view set or local crop, from one generator (docs/method.md
section 3). The sampler never sees an image; the renderer resolves the decisions on each image's own size.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from dpal.config import ViewConfig
from dpal.views.records import (CROP_BLOCK_FIELDS, CROP_TRIES, LOCAL_CROP_BLOCK, LOCAL_CROP_FIELD_NAMES, LOCAL_CROP_FIELDS,
                                MAX_BACKGROUNDS, VIEW_PARAMS_VERSION, VIEW_SET_FIELDS, CropFields, ViewSetFields,
                                field_span)

# Positions are drawn on this grid: exact in float32, so floor(pos * range) never reaches the range.
_POSITION_STEPS = 2**24


def _uniform(u: torch.Tensor, bounds: Sequence[float]) -> torch.Tensor:
    return bounds[0] + u * (bounds[1] - bounds[0])


def _sample_crop_blocks(generator: torch.Generator, n: int, cfg: ViewConfig, *, scale, aspect,
                        blur_p: float, solarize_p: float = 0.0) -> torch.Tensor:
    """``n`` crop blocks (float64 ``[n, CROP_BLOCK_FIELDS]``): RandomResizedCrop's tries and position, flip,
    jitter, grayscale, blur, solarize. Every try is drawn, since which one fits depends on the image's size."""
    u = torch.rand(n, 12, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    order = torch.rand(n, 4, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    tries = torch.rand(n, 2, CROP_TRIES, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    block = torch.zeros(n, CROP_BLOCK_FIELDS, dtype=torch.float64)
    fields = CropFields.of(block)  # views: writing a field writes the block
    fields.scales[:] = _uniform(tries[:, 0], scale)
    fields.aspects[:] = torch.exp(_uniform(tries[:, 1], (math.log(aspect[0]), math.log(aspect[1]))))
    fields.pos_y[:] = torch.floor(u[:, 0] * _POSITION_STEPS) / _POSITION_STEPS
    fields.pos_x[:] = torch.floor(u[:, 1] * _POSITION_STEPS) / _POSITION_STEPS
    fields.flip[:] = (u[:, 2] < cfg.flip_p).double()
    jitter = u[:, 3] < cfg.jitter_p
    brightness, contrast, saturation, hue = cfg.jitter
    factors = torch.stack([
        _uniform(u[:, 4], (max(0.0, 1 - brightness), 1 + brightness)),
        _uniform(u[:, 5], (max(0.0, 1 - contrast), 1 + contrast)),
        _uniform(u[:, 6], (max(0.0, 1 - saturation), 1 + saturation)),
        _uniform(u[:, 7], (-hue, hue)),
    ], dim=1)
    neutral = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    fields.jitter[:] = jitter.double()
    fields.factors[:] = torch.where(jitter[:, None], factors, neutral)
    fields.order[:] = order.argsort(dim=1).double()  # a uniform random permutation, like randperm
    fields.gray[:] = (u[:, 8] < cfg.gray_p).double()
    fields.blur_sigma[:] = torch.where(u[:, 9] < blur_p, _uniform(u[:, 10], cfg.blur_sigma), 0.0)
    fields.solarize[:] = (u[:, 11] < solarize_p).double()
    return block


def _check_canvas_geometry(cfg: ViewConfig) -> None:
    canvas_h, canvas_w = cfg.crowd_size
    person_h, person_w = cfg.local_size
    problems = []
    if cfg.paste_y[0] < 0 or cfg.paste_y[1] + person_h > canvas_h:
        problems.append(f"paste_y {cfg.paste_y} puts a {person_h}-high person outside the {canvas_h}-high canvas")
    if cfg.first_person_x[0] < 0 or cfg.first_person_x[1] + person_w > cfg.second_person_x_max:
        problems.append(f"first_person_x {cfg.first_person_x} leaves no room for the second person "
                        f"before second_person_x_max {cfg.second_person_x_max}")
    if cfg.second_person_x_max + person_w > canvas_w:
        problems.append(f"second_person_x_max {cfg.second_person_x_max} puts the second person outside "
                        f"the {canvas_w}-wide canvas")
    if problems:
        raise ValueError("ViewConfig crowd geometry is invalid: " + "; ".join(problems))


def _randint(u: torch.Tensor, low: torch.Tensor | int, high: torch.Tensor | int) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive) from uniforms in [0, 1)."""
    return low + torch.floor(u * (torch.as_tensor(high) - low + 1)).clamp_(max=torch.as_tensor(high) - low)


def sample_view_sets(generator: torch.Generator, n: int, *, num_backgrounds: int,
                     cfg: ViewConfig = ViewConfig()) -> torch.Tensor:
    """Draw ``n`` view sets (global view + crowd view) as float32 records ``[n, VIEW_SET_FIELDS]`` (CPU).

    Every random decision comes from ``generator``: the same generator state gives the same records.
    """
    if num_backgrounds < 1:
        raise ValueError("the background pool is empty: the crowd view needs at least one background "
                         "image (num_backgrounds >= 1)")
    if num_backgrounds > MAX_BACKGROUNDS:
        raise ValueError(f"num_backgrounds {num_backgrounds} exceeds {MAX_BACKGROUNDS}, the largest pool "
                         f"a float32 record indexes exactly")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_canvas_geometry(cfg)
    global_ = _sample_crop_blocks(generator, n, cfg, scale=cfg.global_scale, aspect=cfg.person_aspect,
                                  blur_p=cfg.global_blur_p)
    background = _sample_crop_blocks(generator, n, cfg, scale=cfg.background_scale,
                                     aspect=cfg.background_aspect, blur_p=cfg.background_blur_p,
                                     solarize_p=cfg.background_solarize_p)
    person = _sample_crop_blocks(generator, n, cfg, scale=cfg.local_scale, aspect=cfg.person_aspect,
                                 blur_p=cfg.local_blur_p)
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    person_w = cfg.local_size[1]
    records = torch.zeros(n, VIEW_SET_FIELDS, dtype=torch.float64)
    fields = ViewSetFields.of(records)  # views: writing a field writes the records
    fields.version[:] = VIEW_PARAMS_VERSION
    fields.global_view[:] = global_
    fields.background[:] = background
    fields.person[:] = person
    fields.background_index[:] = _randint(u[:, 0], 0, num_backgrounds - 1)
    x1 = _randint(u[:, 2], *cfg.first_person_x)
    fields.paste[:] = torch.stack([
        _randint(u[:, 1], *cfg.paste_y), x1,
        _randint(u[:, 3], *cfg.paste_y), _randint(u[:, 4], x1 + person_w, cfg.second_person_x_max),
    ], dim=1)
    return records.float()


def sample_local_crops(generator: torch.Generator, n: int, cfg: ViewConfig = ViewConfig()) -> torch.Tensor:
    """Draw ``cfg.num_local`` local crops for each of ``n`` images: float32 ``[n, num_local, LOCAL_CROP_FIELDS]``."""
    blocks = _sample_crop_blocks(generator, n * cfg.num_local, cfg, scale=cfg.local_scale,
                                 aspect=cfg.person_aspect, blur_p=cfg.local_blur_p)
    records = torch.zeros(len(blocks), LOCAL_CROP_FIELDS, dtype=torch.float64)
    records[:, LOCAL_CROP_BLOCK] = blocks
    records[:, field_span(LOCAL_CROP_FIELD_NAMES, "version")] = VIEW_PARAMS_VERSION
    return records.float().reshape(n, cfg.num_local, LOCAL_CROP_FIELDS)

