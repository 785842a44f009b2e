"""Run folder bookkeeping: atomic checkpoints, exact resume state, and refusing to mix runs.

A checkpoint is written to a temporary file in the run folder, flushed and fsynced, then renamed
over `checkpoint.pt` (and the folder fsynced): a kill at any moment leaves either the previous
complete checkpoint or the new one, never a torn file. Nothing here is written after a failed step,
so a run that dies (NaN loss, crash, kill) never replaces the last good checkpoint.

One writer per run folder: `claim_run_folder` takes the folder's lock (RUN_DIR/.lock, inside the folder itself,
so every path to it meets the same lock; held by rank 0 for the whole run, deleted when released) before it
checks the recorded configuration, so a second process or job on the same folder is refused in one line
instead of interleaving metrics and checkpoints.

Every run draws a `run_id` when it starts (recorded in run.json); every checkpoint carries it, and a resume
refuses a checkpoint of another run (copied or moved in) instead of training that run's weights under this
run's settings.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

from dpal.checkpoints import unreadable_reason
from dpal.errors import UserError
from formats.run_spec import spec_dict, spec_differences
from runtime.durable import WriterLock, atomic_write, disk_description, job_writer_lock, temporary_siblings

CHECKPOINT_NAME = "checkpoint.pt"
RUN_CONFIG_NAME = "run.json"
LOCK_NAME = ".lock"
CHECKPOINT_FORMAT = 2  # 2: the checkpoint names its run (run_id)


class RunFolderError(UserError):
    """The output folder cannot be used as asked (holds another run, or nothing to resume)."""


def save_checkpoint(run_dir: Path, state: dict, run_id: str) -> Path:
    """Atomically replace RUN_DIR/checkpoint.pt by `state` (tensors, numbers, strings, nested dicts/lists) of the
    run `run_id`; a failed write (full disk, ...) is one RunFolderError naming the file and its disk, and leaves
    the previous checkpoint in place (with none, the run folder is removed by `run_training`, as it says)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    writer = _WriteErrors()
    had_one = path.is_file()
    try:
        atomic_write({path: lambda handle: torch.save({"format": CHECKPOINT_FORMAT, "run_id": run_id, **state},
                                                      writer.wrap(handle))})
    except (OSError, RuntimeError) as exc:
        failure = writer.error or exc
        reason = failure.strerror if isinstance(failure, OSError) else str(failure).strip().splitlines()[0]
        if isinstance(failure, OSError):
            reason += f", {disk_description(path.parent)}"
        then = ("the previous checkpoint is kept: free space and continue with --resume" if had_one else
                "no checkpoint had been written yet, so the run folder is removed: free space and run the same "
                "command again, without --resume")
        raise RunFolderError(f"cannot write checkpoint {path} ({reason}); {then}") from exc
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


def load_checkpoint(run_dir: Path, run_id: str | None, *, path: Path | None = None, purpose: str = "--resume",
                    mmap: bool = False) -> dict:
    """The state saved by `save_checkpoint` (RUN_DIR/checkpoint.pt, or `path`) for the run `run_id`; a clear
    error naming `purpose` if it is missing, unreadable or another run's. `run_id` None: a checkpoint read for
    its weights alone, whatever run wrote it. `mmap`: map the tensors instead of reading them (a cheap check)."""
    path = Path(run_dir) / CHECKPOINT_NAME if path is None else Path(path)
    if not path.is_file():
        hint = " (start it again without --resume, after removing the folder)" if purpose == "--resume" else ""
        raise RunFolderError(f"{purpose}: {path} does not exist; the run in {run_dir} has not saved a "
                             f"checkpoint yet{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # damaged, foreign, or holding objects that are not allowed (never unpickled)
        raise RunFolderError(f"{purpose}: {path}: {unreadable_reason(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunFolderError(f"{purpose}: {path} has checkpoint format {getattr(state, 'get', dict().get)('format')!r}, "
                             f"this trainer writes format {CHECKPOINT_FORMAT}; start a new run in another folder")
    if run_id is not None and state.get("run_id") != run_id:
        raise RunFolderError(f"{purpose}: {path} belongs to another run (run id {state.get('run_id')}, while "
                             f"{Path(run_dir) / RUN_CONFIG_NAME} records {run_id}): it was copied or moved here; "
                             f"resume in the folder it was written in, or start a new run in another folder")
    return state


def recorded_compute_threads(run_dir: Path) -> int | None:
    """The torch CPU thread count RUN_DIR/run.json records, for a resume to compute with (None: none readable;
    the resume's own checks then say what is wrong with the folder)."""
    try:
        recorded = json.loads((Path(run_dir) / RUN_CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    threads = recorded.get("compute_threads") if isinstance(recorded, dict) else None
    return threads if isinstance(threads, int) and threads >= 1 else None


def recorded_run_id(run_dir: Path) -> str:
    """The run id that RUN_DIR/run.json records (read after `claim_run_folder` checked it)."""
    return json.loads((Path(run_dir) / RUN_CONFIG_NAME).read_text())["run_id"]


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


def prepare_run_folder(run_dir: Path, run_config: dict, *, resume: bool, resumable_keys: set[str],
                       inexact_keys: dict[str, str], inexact: bool) -> None:
    """Create or re-open RUN_DIR for a run described by `run_config` (JSON-serialisable).

    A fresh run needs a folder that is absent or empty, and draws its run id. A resumed run needs the same
    configuration as the one recorded, except `resumable_keys`, which do not change what is computed (the step
    limit, logging intervals, decoding threads). `inexact_keys` (key -> how to get the recorded value back)
    change the arithmetic: a resume that changes one is refused, unless `inexact`, which records the change
    in run.json (`inexact_resumes`) and says so on stderr.
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
        own = {"run_id", "inexact_resumes"}  # what the folder records of itself, not of the command
        differences = describe_changes(recorded, run_config,
                                       (set(recorded) | set(run_config)) - resumable_keys - set(inexact_keys) - own)
        if differences:
            detail = "; ".join(differences)
            raise RunFolderError(f"--resume: the run in {run_dir} was started with other settings ({detail}); "
                                 f"resume with the recorded settings or start a new run in another folder")
        arithmetic = describe_changes(recorded, run_config, set(inexact_keys))
        if arithmetic and not inexact:
            remedies = "; ".join(dict.fromkeys(inexact_keys[key] for key, _, _ in
                                               spec_differences(recorded, run_config, set(inexact_keys))))
            raise RunFolderError(f"--resume: the run in {run_dir} computed with other settings "
                                 f"({'; '.join(arithmetic)}), so its losses would not continue bit-identically: "
                                 f"{remedies}; or pass --inexact-resume to continue anyway (recorded in "
                                 f"{RUN_CONFIG_NAME})")
        load_checkpoint(run_dir, recorded.get("run_id"), mmap=True)  # this run's, before run.json changes
        if arithmetic:
            print(f"warning: --inexact-resume: continuing with other arithmetic ({'; '.join(arithmetic)}); the "
                  f"losses from here on differ from an uninterrupted run's (recorded in {config_path})",
                  file=sys.stderr)
        changed = resumable_keys | (set(inexact_keys) if inexact else set())
        merged = {**recorded, **{key: run_config[key] for key in changed if key in run_config}}
        if arithmetic:
            merged["inexact_resumes"] = recorded.get("inexact_resumes", []) + [arithmetic]
        atomic_write({config_path: json.dumps(merged, indent=2).encode()})
        return
    if run_dir.exists() and any(entry.name != LOCK_NAME for entry in run_dir.iterdir()):
        what = "another run" if config_path.is_file() else "other files"
        raise RunFolderError(f"output folder {run_dir} already holds {what}; pass --resume to continue the run "
                             f"recorded there, or choose an empty/new --out (nothing was written)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write({config_path: json.dumps({**run_config, "run_id": uuid.uuid4().hex}, indent=2).encode()})


def describe_changes(recorded: dict, now: dict, keys) -> list[str]:
    """One line per differing key, nested dicts (the store's identity) down to the differing leaf."""
    return [f"{key} differs" if len(repr(have)) + len(repr(want)) > 200  # e.g. a calibration vector: name it
            else f"{key}: recorded {have!r}, now {want!r}" for key, have, want in spec_differences(recorded, now, keys)]


def claim_run_folder(run_dir: Path, run_config: dict, *, resume: bool, resumable_keys: set[str],
                     inexact_keys: dict[str, str], inexact: bool) -> WriterLock:
    """Take RUN_DIR's writer lock for this run (all ranks of one torchrun job together), then
    `prepare_run_folder` under it; a refusal (busy, or the folder's check) is RunFolderError on every rank and
    leaves nothing behind (no lock file, no folder this call made). Keep the returned lock until the run ends."""
    import torch.distributed as dist

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():  # before the lock file is made inside it
        raise RunFolderError(f"--out {run_dir} is a file, not a folder; choose a new or empty folder")
    if resume and not run_dir.is_dir():
        raise RunFolderError(f"--resume: {run_dir} does not exist; start a new run there without --resume")
    made = not run_dir.exists()
    if made and (not dist.is_initialized() or dist.get_rank() == 0):
        run_dir.mkdir(parents=True, exist_ok=True)  # the lock file lives inside
    try:
        return job_writer_lock(run_dir.resolve() / LOCK_NAME, f"run folder {run_dir}", check=lambda: prepare_run_folder(
            run_dir, run_config, resume=resume, resumable_keys=resumable_keys, inexact_keys=inexact_keys,
            inexact=inexact))
    except ValueError as exc:
        if made and run_dir.is_dir() and not any(run_dir.iterdir()):
            shutil.rmtree(run_dir)
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
