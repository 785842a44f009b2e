"""Durable files and one writer at a time: what every file the two stages write goes through.

`atomic_write` is how every file that a later command relies on is written (the images file and its manifest,
store shard markers, checkpoints, run.json, the metrics kept on resume, student exports): each file is written
under a temporary sibling name, flushed and fsynced, and only then renamed over its path, and its folder
fsynced. A kill at any moment leaves every file either as it was or complete,
never torn. `WriterLock` / `job_writer_lock` keep a store or a run folder to one writer (one process, or the
ranks of one torchrun job).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

from dpal.errors import UserError


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under `root` (a store built under a temporary name, before its rename)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(files: Mapping[str | os.PathLike, bytes | Callable[[BinaryIO], object] | Path]) -> None:
    """Write each file durably, whole or not at all. Its content (bytes, or a function that writes into the open
    binary file) goes into a temporary sibling, which is flushed and fsynced; content given as a Path is a file
    another library has already written (an FFCV writer, which takes a path), fsynced where it is. Only when
    every file is written are they renamed over their paths, in the given order, and their folders fsynced; so
    files written together (an export's weights and config) never sit beside a half-written partner. Nothing
    temporary is left behind, except by a kill (`temporary_siblings` finds those)."""
    written: dict[Path, Path] = {}
    try:
        for path, content in files.items():
            path = Path(path)
            if isinstance(content, Path):
                written[path] = content
                fsync_path(content)
                continue
            written[path] = _temporary(path)
            with open(written[path], "wb") as handle:
                handle.write(content) if isinstance(content, bytes) else content(handle)
                handle.flush()
                os.fsync(handle.fileno())
        for path, temporary in written.items():
            os.replace(temporary, path)
    finally:
        for temporary in written.values():
            temporary.unlink(missing_ok=True)
    for folder in dict.fromkeys(path.parent for path in written):
        fsync_path(folder)


def disk_description(path: str | os.PathLike) -> str:
    """The disk (file system) holding `path`, for a full-disk message: its mount point and the space left."""
    path = Path(path).resolve()
    mount = next((folder for folder in (path, *path.parents) if os.path.ismount(folder)), Path("/"))
    try:
        free = shutil.disk_usage(path if path.exists() else mount).free
    except OSError:
        return f"on the disk mounted at {mount}"
    return f"on the disk mounted at {mount}, {free / 2 ** 20:.1f} MiB free"


def temporary_siblings(path: str | os.PathLike) -> list[Path]:
    """The temporary files `atomic_write` left beside `path` when killed during a write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


class WriterRefusedError(UserError):
    """Another process (another job) is writing the store or run folder, or its check under the lock failed."""


class WriterLock:
    """Exclusive advisory lock (fcntl.flock) on a lock file, held by one writer for its whole lifetime.

    The kernel drops it when the holder exits, however it exits (a SIGKILL leaves a stale file that the next
    writer simply locks). The file holds the holder's pid and host, for the message a refused writer prints. The
    holder deletes it when it releases the lock, while still holding it; a writer that locked a file just
    deleted (it opened the path before the deletion) sees that its file is no longer the one at the path and
    tries again, so two writers never hold locks on two different files of one path. The path should be a
    resolved one (`Path.resolve`): a symlink or `..` must lead every writer to the same file.
    """

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock without waiting: None when taken, else the one-line refusal naming the holder."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                return (f"{self.what} is being written by {holder} (lock {self.path}); wait for it to finish or stop "
                        f"it first: one writer at a time (nothing was written)")
            except OSError as exc:  # a file system without flock (e.g. Lustre mounted with noflock): say so, go on
                print(f"warning: cannot lock {self.path} ({exc.strerror}); make sure no other process writes "
                      f"{self.what}", file=sys.stderr)
            if self._is_at_path(fd):
                break
            os.close(fd)  # the previous holder deleted this file while we waited to lock it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return None

    def _is_at_path(self, fd: int) -> bool:
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)

    def release(self) -> None:
        """Delete the lock file and drop the lock (closing the descriptor drops the flock)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def job_writer_lock(path: str | os.PathLike, what: str, check=None) -> WriterLock:
    """The writer lock for this process, or for this torchrun job: rank 0 takes it, then runs `check()` (the
    identity check, which must see what the previous holder left) under it, and every rank learns the outcome.
    So the ranks of one job write together, and any other process or job is refused (WriterRefusedError on
    every rank, with the one-line reason; a ValueError from `check` is such a reason and frees the lock).
    Release the lock (or use it as a context manager) when the writing is done."""
    import torch.distributed as dist

    lock = WriterLock(path, what)
    refusal = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        refusal = lock.acquire()
        if refusal is None and check is not None:
            try:
                check()
            except ValueError as exc:
                lock.release()
                refusal = str(exc)
    if dist.is_initialized():
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise WriterRefusedError(refusal)
    return lock
