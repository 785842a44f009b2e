"""Host buffers of a render call: decoded images packed into one pixel buffer (``pack_images``), a plan's
tensors staged in one byte buffer (``StagedTensors``), and small host-to-device copies that never stall.

Everything here runs on the host; the device only ever receives whole buffers.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

def to_rgb_uint8(array) -> torch.Tensor:
    """A decoded image (numpy array or tensor) as a uint8 ``[H, W, 3]`` tensor.

    Grey ``[H, W]`` / ``[H, W, 1]`` is repeated to three channels; RGBA drops alpha (as PIL's
    ``convert('RGB')``); RGB is returned as is (no copy).
    """
    if not isinstance(array, torch.Tensor):
        array = np.asarray(array)
        # Read-only buffers (PIL, memory maps) are copied: torch cannot wrap them safely.
        array = torch.from_numpy(array if array.flags.writeable else array.copy())
    image = array
    if image.dtype != torch.uint8:
        raise ValueError(f"image must be uint8 (decoded 8-bit pixels), got dtype {image.dtype} "
                         f"with shape {tuple(image.shape)}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (grey, RGB, RGBA), "
                         f"got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty (shape {tuple(image.shape)}): it was not decoded")
    if image.shape[2] == 1:
        return image.expand(-1, -1, 3)
    return image[:, :, :3]


def as_images(images: Sequence, what: str) -> list[torch.Tensor]:
    converted = []
    for i, image in enumerate(images):
        try:
            converted.append(to_rgb_uint8(image))
        except ValueError as error:
            raise ValueError(f"{what}[{i}]: {error}") from None
    return converted



def upload(tensor: torch.Tensor, device) -> torch.Tensor:
    """Host -> device without blocking the host.

    A copy from pageable memory may synchronize the stream; render issues dozens of small uploads
    (weights, indices, factors), so they go through pinned staging memory and never stall the queue.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)



class PackedImages(NamedTuple):
    """Variable-size RGB images in one buffer, the source every crop of a render call is gathered from.

    ``pixels`` is uint8 ``[P, 3]``: the rows of image ``i`` start at pixel ``offsets[i]``, one image
    after another, followed by zero pixels as wide as the widest image, so that a window of any crop
    width starting in any row stays inside. ``offsets``, ``heights``, ``widths`` are int64 host tensors:
    planning reads them, the device never does.
    """
    pixels: torch.Tensor
    offsets: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "PackedImages":
        return self._replace(pixels=self.pixels.to(device, non_blocking=non_blocking))

    def select(self, start: int, stop: int) -> "PackedImages":
        """Images ``start..stop-1`` (the same pixel buffer)."""
        return self.take(slice(start, stop))

    def take(self, positions: torch.Tensor | slice) -> "PackedImages":
        """Images ``positions[0], positions[1], ...`` (the same pixel buffer; an image may be taken twice)."""
        return self._replace(offsets=self.offsets[positions], heights=self.heights[positions],
                             widths=self.widths[positions])


def pack_images(images: Sequence, what: str = "images", pin_memory: bool = False) -> PackedImages:
    """Pack decoded images (any mix of grey / RGB / RGBA uint8, see ``to_rgb_uint8``) into one buffer.

    The buffer is built where the images are (one concatenation); ``pin_memory`` pins it when they are on
    the host, for a non-blocking copy to the device with ``PackedImages.to``.
    """
    images = as_images(images, what)
    heights = torch.tensor([image.shape[0] for image in images], dtype=torch.int64)
    widths = torch.tensor([image.shape[1] for image in images], dtype=torch.int64)
    sizes = heights * widths
    total, pad = int(sizes.sum()), int(widths.max())
    source = images[0].device
    pixels = torch.empty(total + pad, 3, dtype=torch.uint8, device=source,
                         pin_memory=pin_memory and source.type == "cpu")
    torch.cat([image.reshape(-1, 3) for image in images], out=pixels[:total])
    pixels[total:] = 0
    return PackedImages(pixels, torch.cumsum(sizes, 0) - sizes, heights, widths)


class StagedTensors:
    """Host tensors of several dtypes laid out in one byte buffer: a whole plan moves in one copy."""

    _ALIGN = 16  # bytes; every dtype staged here can be viewed at such an offset

    def __init__(self, buffer: torch.Tensor, layout: tuple[tuple[int, torch.dtype, tuple[int, ...]], ...]):
        self.buffer, self.layout = buffer, layout

    @classmethod
    def stage(cls, tensors: Sequence[torch.Tensor], pin_memory: bool) -> "StagedTensors":
        layout, offset = [], 0
        for tensor in tensors:
            layout.append((offset, tensor.dtype, tuple(tensor.shape)))
            offset += -(-tensor.numel() * tensor.element_size() // cls._ALIGN) * cls._ALIGN
        staged = cls(torch.empty(offset, dtype=torch.uint8, pin_memory=pin_memory), tuple(layout))
        for key, tensor in enumerate(tensors):
            staged[key].copy_(tensor)
        return staged

    def __getitem__(self, key: int) -> torch.Tensor:
        offset, dtype, shape = self.layout[key]
        nbytes = math.prod(shape) * dtype.itemsize
        return self.buffer[offset:offset + nbytes].view(dtype).view(shape)

    def to(self, device, non_blocking: bool = False) -> "StagedTensors":
        return StagedTensors(self.buffer.to(device, non_blocking=non_blocking), self.layout)


class PlanTensors:
    """Collects the tensors of a plan; each ``add`` returns the key it is staged under."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> int:
        self.tensors.append(tensor.contiguous())
        return len(self.tensors) - 1

