"""One writer per store or run folder, whatever path leads to it; a refused command leaves no lock behind, and a
writer that finishes removes its lock. Real files, real flock, a real second process holding a lock."""
import subprocess
import sys

import pytest

from formats.store import store_lock_path
from runtime.durable import WriterLock, WriterRefusedError, job_writer_lock
from train_student.checkpoint import RunFolderError, claim_run_folder, recorded_run_id, save_checkpoint

KEYS = dict(resumable_keys={"max_steps"}, inexact_keys={}, inexact=False)


def test_a_store_reached_through_a_symlink_or_dotdot_meets_the_same_lock(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.zarr").symlink_to(tmp_path / "real" / "s.zarr")
    held = job_writer_lock(store_lock_path(tmp_path / "real" / "s.zarr"), "store s.zarr")
    for path in (tmp_path / "elsewhere" / "link.zarr", tmp_path / "elsewhere" / ".." / "real" / "s.zarr"):
        with pytest.raises(WriterRefusedError, match=r"store .* is being written by pid \d+ on .*one writer at a"):
            job_writer_lock(store_lock_path(path), f"store {path}")
    held.release()
    assert list((tmp_path / "real").iterdir()) == []  # the holder removed its lock file
    job_writer_lock(store_lock_path(tmp_path / "elsewhere" / "link.zarr"), "store").release()


def test_a_lock_held_by_another_process_refuses_and_a_killed_holders_file_is_taken_over(tmp_path):
    path = tmp_path / ".s.zarr.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl, os, time\nfd = os.open({str(path)!r}, "
                               f"os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'pid holder')"
                               f"\nprint('held', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refusal = WriterLock(path, "store s.zarr").acquire()
        assert refusal.startswith("store s.zarr is being written by pid holder") and path.exists()
    finally:
        holder.kill()  # like a SIGKILLed writer: its lock file stays, its flock goes
        holder.wait()
    lock = WriterLock(path, "store s.zarr")
    assert lock.acquire() is None and path.read_text().startswith("pid ")
    lock.release()
    assert not path.exists()


def test_a_run_folder_lock_is_on_the_folder_whatever_the_path_and_a_refusal_leaves_nothing(tmp_path):
    run, link = tmp_path / "run", tmp_path / "link"
    config = {"recipe": "a", "max_steps": 5}
    held = claim_run_folder(run, config, resume=False, **KEYS)
    save_checkpoint(run, {"step": 1}, recorded_run_id(run))
    link.symlink_to(run)
    with pytest.raises(RunFolderError, match="is being written by"):
        claim_run_folder(link, config, resume=True, **KEYS)
    held.release()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "run.json"]  # lock removed on release
    with pytest.raises(RunFolderError, match="already holds another run"):
        claim_run_folder(link, config, resume=False, **KEYS)
    with pytest.raises(RunFolderError, match="recipe: recorded 'a', now 'b'"):
        claim_run_folder(tmp_path / "run" / ".." / "run", {**config, "recipe": "b"}, resume=True, **KEYS)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "run.json"]  # refused: no lock file left behind
    claim_run_folder(link, {**config, "max_steps": 9}, resume=True, **KEYS).release()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "run.json"]
