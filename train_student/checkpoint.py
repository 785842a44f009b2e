"""Run folder bookkeeping: atomic checkpoints, exact resume state, and refusing to mix runs.

A checkpoint is written to a temporary file in the run folder, flushed and fsynced, then renamed
over `checkpoint.pt` (and the folder fsynced): a kill at any moment leaves either the previous
complete checkpoint or the new one, never a torn file. Nothing here is written after a failed step,
so a run that dies (NaN loss, crash, kill) never replaces the last good checkpoint.

One writer per run folder: `claim_run_folder` takes the folder's lock (RUN_DIR/.lock, held by rank 0 for the
whole run) before it checks the recorded configuration, so a second process or job on the same folder is
refused in one line instead of interleaving metrics and checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from dpal.checkpoints import unreadable_reason
from dpal.errors import UserError
from formats.durable import WriterLock, atomic_write, job_writer_lock, temporary_siblings
from formats.run_spec import spec_dict, spec_differences

CHECKPOINT_NAME = "checkpoint.pt"
RUN_CONFIG_NAME = "run.json"
LOCK_NAME = ".lock"
CHECKPOINT_FORMAT = 1


class RunFolderError(UserError):
    """The output folder cannot be used as asked (holds another run, or nothing to resume)."""


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    """Atomically replace RUN_DIR/checkpoint.pt by `state` (tensors, numbers, strings, nested dicts/lists);
    a failed write (full disk, ...) is one RunFolderError and leaves the previous checkpoint in place."""
    path = Path(run_dir) / CHECKPOINT_NAME
    writer = _WriteErrors()
    try:
        atomic_write({path: lambda handle: torch.save({"format": CHECKPOINT_FORMAT, **state}, writer.wrap(handle))})
    except (OSError, RuntimeError) as exc:
        failure = writer.error or exc
        reason = failure.strerror if isinstance(failure, OSError) else str(failure).strip().splitlines()[0]
        raise RunFolderError(f"cannot write checkpoint {path} ({reason}); the previous checkpoint, if any, is "
                             f"kept: free space and continue with --resume") from exc
    return path


class _WriteErrors:
    """A file wrapper that remembers the OSError of a failed write: torch.save reports it only as a
    RuntimeError about the zip position, which would hide a full disk."""

    def __init__(self):
        self.handle, self.error = None, None

    def wrap(self, handle):
        self.handle = handle
        return self

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def load_checkpoint(run_dir: Path, *, path: Path | None = None, purpose: str = "--resume") -> dict:
    """The state saved by `save_checkpoint` (RUN_DIR/checkpoint.pt, or `path`); a clear error naming `purpose`
    if it is missing or unreadable."""
    path = Path(run_dir) / CHECKPOINT_NAME if path is None else Path(path)
    if not path.is_file():
        hint = " (start it again without --resume, after removing the folder)" if purpose == "--resume" else ""
        raise RunFolderError(f"{purpose}: {path} does not exist; the run in {run_dir} has not saved a "
                             f"checkpoint yet{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged, foreign, or holding objects that are not allowed (never unpickled)
        raise RunFolderError(f"{purpose}: {path}: {unreadable_reason(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunFolderError(f"{purpose}: {path} has checkpoint format {getattr(state, 'get', dict().get)('format')!r}, "
                             f"this trainer writes format {CHECKPOINT_FORMAT}")
    return state


def keep_step_copy(run_dir: Path, step: int, keep: int) -> None:
    """With `keep` > 1: RUN_DIR/checkpoint-STEP.pt for the checkpoint just saved (a hard link to checkpoint.pt, so
    no extra space while it is the newest; a copy where links are not supported), and only the newest `keep` of
    them are kept. `keep` 1: checkpoint.pt alone, as always."""
    if keep <= 1:
        return
    run_dir = Path(run_dir)
    target = run_dir / f"checkpoint-{step:08d}.pt"
    target.unlink(missing_ok=True)
    try:
        os.link(run_dir / CHECKPOINT_NAME, target)
    except OSError:
        shutil.copyfile(run_dir / CHECKPOINT_NAME, target)
    for stale in sorted(run_dir.glob("checkpoint-*.pt"))[:-keep]:
        stale.unlink()


def prepare_run_folder(run_dir: Path, run_config: dict, *, resume: bool, resumable_keys: set[str]) -> None:
    """Create or re-open RUN_DIR for a run described by `run_config` (JSON-serialisable).

    A fresh run needs a folder that is absent or empty; a resumed run needs the same configuration as
    the one recorded, except `resumable_keys` (e.g. the step limit, logging intervals).
    """
    run_dir = Path(run_dir)
    config_path = run_dir / RUN_CONFIG_NAME
    run_config = spec_dict(run_config)  # tuples -> lists, as the recorded copy reads back
    if resume:
        if not config_path.is_file():
            raise RunFolderError(f"--resume: {run_dir} holds no run ({RUN_CONFIG_NAME} missing); "
                                 f"start a new run there without --resume")
        try:
            recorded = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"--resume: {config_path} is damaged ({exc}); the run cannot be checked, start "
                                 f"a new run in another folder") from exc
        for stale in temporary_siblings(run_dir / CHECKPOINT_NAME):  # left by a kill during a save
            stale.unlink(missing_ok=True)
        differences = describe_changes(recorded, run_config, (set(recorded) | set(run_config)) - resumable_keys)
        if differences:
            detail = "; ".join(differences)
            raise RunFolderError(f"--resume: the run in {run_dir} was started with other settings ({detail}); "
                                 f"resume with the recorded settings or start a new run in another folder")
        merged = {**recorded, **{key: run_config[key] for key in resumable_keys if key in run_config}}
        atomic_write({config_path: json.dumps(merged, indent=2).encode()})
        return
    if run_dir.exists() and any(entry.name != LOCK_NAME for entry in run_dir.iterdir()):
        what = "another run" if config_path.is_file() else "other files"
        raise RunFolderError(f"output folder {run_dir} already holds {what}; pass --resume to continue the run "
                             f"recorded there, or choose an empty/new --out (nothing was written)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write({config_path: json.dumps(run_config, indent=2).encode()})


def describe_changes(recorded: dict, now: dict, keys) -> list[str]:
    """One line per differing key, nested dicts (the store's identity) down to the differing leaf."""
    return [f"{key} differs" if len(repr(have)) + len(repr(want)) > 200  # e.g. a calibration vector: name it
            else f"{key}: recorded {have!r}, now {want!r}" for key, have, want in spec_differences(recorded, now, keys)]


def claim_run_folder(run_dir: Path, run_config: dict, *, resume: bool, resumable_keys: set[str]) -> WriterLock:
    """Take RUN_DIR's writer lock for this run (all ranks of one torchrun job together), then
    `prepare_run_folder` under it; a refusal (busy, or the folder's check) is RunFolderError on every rank.
    Keep the returned lock until the run ends."""
    import torch.distributed as dist

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():  # before the lock file is made inside it
        raise RunFolderError(f"--out {run_dir} is a file, not a folder; choose a new or empty folder")
    if resume and not run_dir.is_dir():
        raise RunFolderError(f"--resume: {run_dir} does not exist; start a new run there without --resume")
    if not resume and (not dist.is_initialized() or dist.get_rank() == 0):
        run_dir.mkdir(parents=True, exist_ok=True)  # the lock file lives inside
    try:
        return job_writer_lock(run_dir / LOCK_NAME, f"run folder {run_dir}", check=lambda: prepare_run_folder(
            run_dir, run_config, resume=resume, resumable_keys=resumable_keys))
    except ValueError as exc:
        raise RunFolderError(str(exc)) from None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG streams a training step consumes (drop-path draws); data randomness is seeded per step."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
