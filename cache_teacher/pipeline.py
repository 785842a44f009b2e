"""`cache_teacher run`'s double-buffered pipeline: the teacher waits neither for rendering nor for the host.

Three threads, each holding one batch of view sets:
- render (`runtime.ahead.RunAhead`, on CUDA with its own stream): decodes the next shard in the background,
  then renders each teacher batch of the shard and hands its views over with an event;
- main: runs the teacher and encodes the targets on the device, then starts non-blocking copies of the
  encoded rows into pinned host buffers, with an event after them (`runtime.ahead.HostCopy`);
- writer: waits on that event, gathers a shard's rows and, once the shard is complete, compresses and
  writes it (while the main thread goes on with the next shard).
So batch N+1 renders while the teacher runs batch N, and the host never waits for the device in between.
The batches, their renders and teacher calls are exactly those of the serial path
(`TargetComputer.shard_rows`), so the store's bytes are the same (a test compares them).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from dpal.shape_mask import ShapeMaskCalibration
from formats.schema import VIEW_PARAMS_ARRAY
from runtime.ahead import HostCopy, RunAhead


def shard_arrays(parts: dict[str, list[torch.Tensor]], params: torch.Tensor) -> dict[str, np.ndarray]:
    """A shard's stored arrays from its batches' encoded rows (host tensors, in batch order); params [n, K, F]."""
    n, k = params.shape[:2]
    arrays = {name: torch.cat(values).reshape(n, k, *values[0].shape[1:]).numpy() for name, values in parts.items()}
    arrays[VIEW_PARAMS_ARRAY] = params.numpy()
    return arrays


def decoded_shards(todo: list[int], load: Callable):
    """(shard, decoded images, view sets [n, K, F]) for each shard of ``todo``, the next one decoded (``load``)
    in a background thread while the caller works on this one."""
    with ThreadPoolExecutor(1, thread_name_prefix="dpal-decode") as reader:
        upcoming = reader.submit(load, todo[0]) if todo else None
        for position, shard in enumerate(todo):
            images, params = upcoming.result()
            if position + 1 < len(todo):
                upcoming = reader.submit(load, todo[position + 1])
            yield shard, images, params


def _teacher_batches(todo: list[int], load: Callable, computer):
    """(shard, its view sets, batches in the shard, batch images, batch view sets) for every teacher batch of
    the shards in ``todo``."""
    for shard, images, params in decoded_shards(todo, load):
        batches = list(computer.shard_batches(images, params))
        for _, batch_images, batch_params in batches:
            yield shard, params, len(batches), batch_images, batch_params


class _ShardCollector:
    """The writer thread's side: gathers each shard's encoded rows and writes the shard once complete."""

    def __init__(self, writer):
        self.writer = writer
        self.parts: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.received: dict[int, int] = {}

    def add(self, shard: int, params: torch.Tensor, batches: int, rows: HostCopy) -> None:
        for name, value in rows.wait().items():
            self.parts.setdefault(shard, {}).setdefault(name, []).append(value)
        self.received[shard] = self.received.get(shard, 0) + 1
        if self.received[shard] == batches:
            del self.received[shard]
            self.writer.write_shard(shard, shard_arrays(self.parts.pop(shard), params))


def process_shards(todo: list[int], load: Callable, writer, computer, calibration: ShapeMaskCalibration,
                   target_format: str, progress) -> None:
    """Compute and write the shards ``todo`` (``load(shard)`` -> (decoded images, view sets [n, K, F]))."""
    def render(item):
        shard, params, batches, batch_images, batch_params = item
        return shard, params, batches, len(batch_params), computer.render(batch_images, batch_params)

    collector = _ShardCollector(writer)
    written = ThreadPoolExecutor(1, thread_name_prefix="dpal-write")
    outstanding: deque = deque()
    try:
        with progress, RunAhead(_teacher_batches(todo, load, computer), render, computer.device,
                                name="dpal-cache-render") as rendered:
            for shard, params, batches, count, views in rendered:
                encoded = computer.encode(computer.run_teacher(views.global_view, views.crowd), calibration,
                                           target_format).arrays()
                outstanding.append(written.submit(collector.add, shard, params, batches, HostCopy(encoded)))
                progress.update(count)
                # Up to a shard of batches may queue behind the write of the previous shard, as the serial
                # path's shard-level overlap allowed; a failed write (a full disk) surfaces at once.
                while outstanding and (outstanding[0].done() or len(outstanding) > batches + 2):
                    outstanding.popleft().result()
            while outstanding:
                outstanding.popleft().result()
    finally:
        written.shutdown(cancel_futures=True)
