"""Work done ahead of its consumer: a producer thread, and on CUDA a side stream with an event per item.

`RunAhead(items, produce, device)` calls ``produce(item)`` for each item of ``items`` on a background
thread, at most ``depth`` finished results ahead of the consumer, who iterates over it. On a CUDA device
the producer runs inside its own stream, so the device work it enqueues (host-to-device copies,
rendering) overlaps whatever the consumer's stream is running; each result carries an event recorded
after its work, and the hand-over makes the consumer's current stream wait on that event (the device
waits, the host never does) and calls ``record_stream`` on every CUDA tensor of the result, so that the
caching allocator does not give its memory back to the producer's stream while the consumer still uses
it. On the CPU the structure is the same without streams: the producer's tensors are ready when
handed over.

`HostCopy` is the way back: device tensors copied into pinned host memory without blocking, with an event
after the copies, so that the host reads them later (`wait`) without draining the device queue.

Used by both stages: the trainer renders batch N+1 while step N computes, the cache renders the next
teacher batch while the teacher runs. Results are bit-identical to calling ``produce`` on the consumer's
thread: the producer uses the same intra-op thread count, and a stream changes when work runs, not what
it computes.
"""
from __future__ import annotations

import threading
from queue import Empty, Full, Queue
from typing import Any, Callable, Iterable

import torch
from torch.utils._pytree import tree_leaves, tree_map

_POLL_S = 0.1  # how often a blocked producer looks for a close()
_DONE = object()


class RunAhead:
    """Iterate over ``produce(item) for item in items``, computed on a producer thread ahead of time.

    Results are nestings of tuples (named ones too), lists and dicts: the hand-over looks for CUDA tensors
    there (`torch.utils._pytree`), not inside other objects.

    ``close()`` (also on leaving a ``with`` block, or when the results run out) stops the producer and
    closes ``items`` if it is a generator, on the producer's thread. An exception raised by ``items`` or
    ``produce`` is raised again by the consumer's next ``next()``, with its traceback.
    """

    def __init__(self, items: Iterable, produce: Callable[[Any], Any], device: torch.device, *, depth: int = 1,
                 name: str = "dpal-ahead"):
        self.device = torch.device(device)
        self._items, self._produce = items, produce
        self._queue: Queue = Queue(maxsize=depth)
        self._stop = threading.Event()
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer thread
    def _run(self) -> None:
        try:
            torch.set_num_threads(self._threads)  # same intra-op split (and so the same CPU rounding) as the consumer
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                stream = torch.cuda.Stream(self.device)
                with torch.cuda.stream(stream):
                    self._produce_all(stream)
            else:
                self._produce_all(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def _produce_all(self, stream) -> None:
        for item in self._items:
            result = self._produce(item)
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
            if not self._put((result, event)):
                return
        self._put(_DONE)

    def _put(self, value) -> bool:
        """Queue ``value``, waiting while the consumer is behind; False once ``close()`` was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=_POLL_S)
                return True
            except Full:
                continue
        return False

    # ------------------------------------------------------------------ consumer
    def __iter__(self) -> "RunAhead":
        return self

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        value = self._queue.get()
        if value is _DONE:
            self.close()
            raise StopIteration
        if isinstance(value, BaseException):
            self.close()
            raise value
        result, event = value
        if event is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(event)
            for leaf in tree_leaves(result):
                if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
                    leaf.record_stream(consumer)
        return result

    def close(self) -> None:
        """Stop the producer and wait for it (it finishes the item in hand, then closes ``items``)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=_POLL_S)
            except Empty:
                pass

    def __enter__(self) -> "RunAhead":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class HostCopy:
    """Tensors (any nesting of lists, tuples and dicts) on their way to the host. On CUDA: non-blocking copies
    into fresh pinned buffers on the current stream and an event after them; `wait()` blocks until that event,
    i.e. until the work queued before the copies is done, not the work queued after. Host tensors are kept
    as they are."""

    def __init__(self, tensors):
        self._event = None
        if any(isinstance(leaf, torch.Tensor) and leaf.is_cuda for leaf in tree_leaves(tensors)):
            tensors = tree_map(_pinned_copy, tensors)
            self._event = torch.cuda.Event()
            self._event.record()
        self._tensors = tensors

    def wait(self):
        """The host tensors, once their copies have landed."""
        if self._event is not None:
            self._event.synchronize()
        return self._tensors


def _pinned_copy(value):
    if not (isinstance(value, torch.Tensor) and value.is_cuda):
        return value
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    return host.copy_(value, non_blocking=True)
