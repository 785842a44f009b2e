"""The view records: every random decision of a view, one float32 field each, named in order.

A field's offset is its place in the ordered name tables below (``CROP_BLOCK_NAMES``, ``VIEW_SET_FIELD_NAMES``,
``LOCAL_CROP_FIELD_NAMES``); the code numbers no field by hand and reads records through ``CropFields`` and
``ViewSetFields``, named views of their columns. The tables in this docstring document the same offsets, and a
test holds them to the name tables.

Record layout (``VIEW_PARAMS_VERSION`` = 2)
-------------------------------------------
Each rendered crop (the global view, the crowd view's background, the crowd view's first pasted person,
every local crop) is described by one 35-field *crop block*:

====  ============  ====================================================================================
 off  field         meaning
====  ============  ====================================================================================
 0+k  scale_k       area fraction of RandomResizedCrop's try k = 0..9, U(scale) (float32, as torchvision)
10+k  aspect_k      aspect (w/h) of try k = 0..9, exp(U(log r_min, log r_max))
  20  pos_y         uniform in [0, 1) on a 2**-24 grid: top = floor(pos_y * (H - h + 1))
  21  pos_x         ... left = floor(pos_x * (W - w + 1))
  22  flip          1 = mirror horizontally (after resizing)
  23  jitter        1 = colour jitter applied (else the factors hold the neutral 1, 1, 1, 0)
  24  brightness    brightness factor
  25  contrast      contrast factor
  26  saturation    saturation factor
  27  hue           hue shift in turns
  28  order_0       jitter op applied first (0 brightness, 1 contrast, 2 saturation, 3 hue)
  29  order_1       ... second
  30  order_2       ... third
  31  order_3       ... fourth
  32  gray          1 = converted to 3-channel grayscale (after the jitter)
  33  blur_sigma    Gaussian blur sigma in pixels of the rendered crop; 0 = no blur
  34  solarize      1 = solarized (crowd background only; always 0 elsewhere)
====  ============  ====================================================================================

A *view set* record (``VIEW_SET_FIELDS`` = 111 float32, 444 bytes; names in ``VIEW_SET_FIELD_NAMES``):

======  ==================  ========================================================================
 index  field               meaning
======  ==================  ========================================================================
     0  version             ``VIEW_PARAMS_VERSION``
  1-35  global.*            crop block of the 256x128 global view, cut from the person image
 36-70  background.*        crop block of the 256x256 crowd canvas, cut from the background image
71-105  person.*            crop block of the first pasted person: a 128x96 local-style crop of the
                            same person image, drawn for the crowd view
   106  background_index    index into the background pool
   107  paste_y1            top of the first person on the canvas, pixels, in [0, 126]
   108  paste_x1            left of the first person
   109  paste_y2            top of the second person (the global view resized to 128x96),
                            drawn independently of paste_y1
   110  paste_x2            left of the second person, in [paste_x1 + 96, 158]
======  ==================  ========================================================================

A *local crop* record (``LOCAL_CROP_FIELDS`` = 36, 144 bytes): ``version`` then one crop block. Local crops
are drawn fresh every epoch (``sample_local_crops``) and never stored. (Version 1 records were 57 and 18
fields, 228 and 72 bytes: one (area, aspect) draw and two position fractions per crop.)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

VIEW_PARAMS_VERSION = 2
# Why records of an older version cannot be rendered by this code (DPAL_SPEC.md "Revisions"), for the refusal.
STALE_VIEW_RECORDS = {1: "crop boxes of spec v2: a box that does not fit shrunk instead of redrawn, positions "
                         "rounded, not torchvision's RandomResizedCrop draw of spec v3"}

# RandomResizedCrop's (area, aspect) tries before its centre-crop fallback (torchvision's fixed count).
CROP_TRIES = 10
CROP_BLOCK_NAMES = (
    tuple(f"scale_{k}" for k in range(CROP_TRIES)) + tuple(f"aspect_{k}" for k in range(CROP_TRIES))
    + ("pos_y", "pos_x", "flip", "jitter", "brightness", "contrast", "saturation", "hue",
       "order_0", "order_1", "order_2", "order_3", "gray", "blur_sigma", "solarize")
)
CROP_BLOCK_FIELDS = len(CROP_BLOCK_NAMES)

VIEW_SET_FIELD_NAMES = (
    ("version",)
    + tuple(f"global.{name}" for name in CROP_BLOCK_NAMES)
    + tuple(f"background.{name}" for name in CROP_BLOCK_NAMES)
    + tuple(f"person.{name}" for name in CROP_BLOCK_NAMES)
    + ("background_index", "paste_y1", "paste_x1", "paste_y2", "paste_x2")
)
VIEW_SET_FIELDS = len(VIEW_SET_FIELD_NAMES)

LOCAL_CROP_FIELD_NAMES = ("version",) + CROP_BLOCK_NAMES
LOCAL_CROP_FIELDS = len(LOCAL_CROP_FIELD_NAMES)

# float32 holds every integer up to 2**24 exactly; a larger pool index would be silently rounded.
MAX_BACKGROUNDS = 2**24


def field_span(names: tuple[str, ...], first: str, last: str | None = None) -> int | slice:
    """Where fields ``first`` .. ``last`` sit in the ordered name table ``names``: the offset of one field
    (``last`` omitted) or the slice of a run of fields."""
    if last is None:
        return names.index(first)
    return slice(names.index(first), names.index(last) + 1)


def _block_span(names: tuple[str, ...], prefix: str) -> slice:
    """The crop block whose field names in ``names`` carry ``prefix``."""
    return field_span(names, prefix + CROP_BLOCK_NAMES[0], prefix + CROP_BLOCK_NAMES[-1])


class CropFields(NamedTuple):
    """The fields of crop blocks ``[..., CROP_BLOCK_FIELDS]`` by meaning. ``of`` returns views of the blocks'
    columns, so writing a field writes the blocks."""
    scales: torch.Tensor  # [..., CROP_TRIES] area fractions of RandomResizedCrop's tries
    aspects: torch.Tensor  # [..., CROP_TRIES] their aspects (w/h)
    pos_y: torch.Tensor
    pos_x: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor  # [..., 4] brightness, contrast, saturation, hue
    order: torch.Tensor  # [..., 4] the jitter ops in the order they run
    gray: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor

    @classmethod
    def of(cls, blocks: torch.Tensor) -> "CropFields":
        return cls(*(blocks[..., span] for span in _CROP_FIELD_SPANS))


_CROP_FIELD_SPANS = tuple(
    field_span(CROP_BLOCK_NAMES, *names) for names in (
        ("scale_0", f"scale_{CROP_TRIES - 1}"), ("aspect_0", f"aspect_{CROP_TRIES - 1}"), ("pos_y",), ("pos_x",),
        ("flip",), ("jitter",), ("brightness", "hue"), ("order_0", "order_3"), ("gray",), ("blur_sigma",),
        ("solarize",)))


class ViewSetFields(NamedTuple):
    """The fields of view set records ``[..., VIEW_SET_FIELDS]`` by meaning (views of the records' columns)."""
    version: torch.Tensor
    global_view: torch.Tensor  # [..., CROP_BLOCK_FIELDS] crop block of the global view
    background: torch.Tensor  # ... of the crowd canvas, cut from the background image
    person: torch.Tensor  # ... of the first pasted person
    background_index: torch.Tensor  # index into the background pool
    paste: torch.Tensor  # [..., 4] y1, x1 of the first person, y2, x2 of the second

    @classmethod
    def of(cls, records: torch.Tensor) -> "ViewSetFields":
        return cls(*(records[..., span] for span in _VIEW_SET_FIELD_SPANS))


_VIEW_SET_FIELD_SPANS = (
    field_span(VIEW_SET_FIELD_NAMES, "version"),
    _block_span(VIEW_SET_FIELD_NAMES, "global."),
    _block_span(VIEW_SET_FIELD_NAMES, "background."),
    _block_span(VIEW_SET_FIELD_NAMES, "person."),
    field_span(VIEW_SET_FIELD_NAMES, "background_index"),
    field_span(VIEW_SET_FIELD_NAMES, "paste_y1", "paste_x2"),
)
# The crop block of a local crop record.
LOCAL_CROP_BLOCK = _block_span(LOCAL_CROP_FIELD_NAMES, "")


class ViewParamsError(ValueError):
    """A view parameter record that this code cannot render (wrong version, shape or content)."""


def check_view_params(params, fields: int = VIEW_SET_FIELDS, what: str = "view set") -> torch.Tensor:
    """``params`` as a float32 CPU tensor ``[..., fields]`` after checking its version and width (the version
    first: a record of another version has another width, and the version says why it cannot be used).

    Raises ``ViewParamsError`` naming the problem (and what to do) otherwise.
    """
    params = torch.as_tensor(params).detach().cpu()
    versions = params[..., 0] if params.ndim >= 1 and params.shape[-1] >= 1 else params.new_zeros(0)
    if versions.numel() and not bool((versions == VIEW_PARAMS_VERSION).all()):
        found = sorted({float(v) for v in versions.unique()[:5]})
        why = "; ".join(STALE_VIEW_RECORDS[int(v)] for v in found if v in STALE_VIEW_RECORDS)
        raise ViewParamsError(
            f"{what} parameters have record version {found}" + (f" ({why})" if why else "")
            + f", this code renders version {VIEW_PARAMS_VERSION}: re-create them with this version of "
            f"dpal.views (for a target store, rebuild it with `python -m cache_teacher run` into a new --out)")
    if params.ndim < 1 or params.shape[-1] != fields:
        raise ViewParamsError(
            f"{what} parameters must have {fields} float32 fields in the last axis (record version "
            f"{VIEW_PARAMS_VERSION}), got shape {tuple(params.shape)}")
    if params.dtype != torch.float32:
        raise ViewParamsError(f"{what} parameters must be float32, got {params.dtype}")
    if not bool(torch.isfinite(params).all()):
        raise ViewParamsError(f"{what} parameters contain NaN or infinite values")
    return params


def background_indices(params) -> torch.Tensor:
    """Index into the background pool of each view set: LongTensor ``[n]``."""
    return ViewSetFields.of(check_view_params(params)).background_index.long()

