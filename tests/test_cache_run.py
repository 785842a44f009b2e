"""cache_teacher run / verify / info end to end on real .beton files, real stores and real processes.

A small ViT teacher (same code path as PATH-B: released-layout checkpoint, load_teacher, render, targets)
keeps the CPU time low; PATH-B itself is exercised by the dry run here and by `make demo`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_teacher.__main__ import main
from cache_teacher.run import RunConfig, RunError, cached_views, run
from cache_teacher.verify import info, verify
from dpal.config import ViewConfig
from dpal.recipes import RECIPES
from dpal.teachers import build_teacher, release_checkpoint
from dpal.views import VIEW_SET_FIELDS
from formats.images import ImageFile
from formats.store import StoreError, open_store
from helpers import TEACHERS_WITH_TINY, TINY, free_port, two_node_launcher, write_packed_inputs

NUM_IMAGES = 10
# The CLI with the tiny teacher registered, for real subprocesses (plain python and torchrun).
CLI_SCRIPT = f"""
import sys
from cache_teacher.__main__ import main
from dpal.config import TeacherSpec
from dpal.recipes import TEACHERS
tiny = TeacherSpec(**{TINY.__dict__!r})
sys.exit(main(sys.argv[1:], teachers=dict(TEACHERS, **{{tiny.name: tiny}})))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = write_packed_inputs(tmp_path_factory.mktemp("cache"), persons=NUM_IMAGES, backgrounds=4, seed=3,
                               workers=2, teacher_spec=TINY)
    (root / "cli.py").write_text(CLI_SCRIPT)
    return root


def _config(root: Path, out: str, **changes) -> RunConfig:
    base = dict(teacher=TINY.name, weights=str(root / "tiny.pth"), images=str(root / "persons.beton"),
                backgrounds=str(root / "backgrounds.beton"), views_per_image=2, out=str(root / out),
                chunk_images=2, shard_images=2, calibration_images=6, batch_size=3, progress=False)
    return RunConfig(**{**base, **changes})


def _cli_args(cfg: RunConfig) -> list[str]:
    return ["run", "--teacher", cfg.teacher, "--weights", cfg.weights, "--images", cfg.images, "--backgrounds",
            cfg.backgrounds, "-K", str(cfg.views_per_image), "--out", cfg.out, "--chunk-images",
            str(cfg.chunk_images), "--shard-images", str(cfg.shard_images), "--calibration-images",
            str(cfg.calibration_images), "--batch-size", str(cfg.batch_size), "--no-progress"]


def _assert_same_store(a: str, b: str) -> None:
    first, second = open_store(a), open_store(b)
    identity = {k: v for k, v in first.attrs.items() if not k.endswith("_path") and k != "store_id"}
    assert identity == {k: v for k, v in second.attrs.items() if not k.endswith("_path") and k != "store_id"}
    for name, array in first.arrays.items():
        assert np.array_equal(array[:], second.arrays[name][:]), name


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Same thread count as the subprocesses (OMP_NUM_THREADS=1): CPU GEMM rounding may depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(inputs):
    cfg = _config(inputs, "reference.zarr")
    summary = run(cfg, teachers=TEACHERS_WITH_TINY)
    assert summary["shards_done"] == summary["num_shards"] == 5
    return cfg


def test_store_contents(reference):
    store = open_store(reference.out)
    attrs = store.attrs
    assert attrs["teacher"] == "tiny-vit" and attrs["target_format"] == "float16" and attrs["views_per_image"] == 2
    assert len(attrs["checkpoint_sha256"]) == 64 and attrs["token_grid"] == [16, 8]
    assert set(attrs["mask_calibration"]) == {"mean", "direction", "low", "high"}
    block, other_set = store.read_block(0, 0), store.read_block(0, 1)
    assert block["local"].shape == (2, 128, 32) and block["local"].dtype == np.float16
    assert block["relation"].shape == (2, 257, 257)
    assert np.allclose(block["relation"].astype(np.float64).sum(-1), 1.0, atol=2e-2)
    assert 0 <= block["mask"].min() and block["mask"].max() <= 1
    assert not np.array_equal(block["view_params"][0], other_set["view_params"][0])  # K distinct view sets


@pytest.mark.e2e
def test_killed_run_resumes_bit_identical(inputs, reference):
    cfg = _config(inputs, "killed.zarr")  # same command (batch size included: GEMM rounding depends on it)
    command = [sys.executable, str(inputs / "cli.py"), *_cli_args(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    progress = Path(cfg.out) / "dpal_progress"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if progress.is_dir() and len(list(progress.glob("*.json"))) >= 1:
            break
        time.sleep(0.01)
    assert process.poll() is None, f"run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(progress.glob("*.json")))
    assert 1 <= done < 5
    with pytest.raises(StoreError, match="incomplete"):
        open_store(cfg.out)
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "5/5 shards done" in resumed.stdout
    _assert_same_store(reference.out, cfg.out)


@pytest.mark.e2e
def test_two_rank_torchrun_equals_one_process(inputs, reference):
    cfg = _config(inputs, "ranks.zarr")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(inputs / "cli.py"), *_cli_args(cfg)], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    markers = [json.loads(p.read_text()) for p in sorted((Path(cfg.out) / "dpal_progress").glob("*.json"))]
    assert [m["shard"] for m in markers] == list(range(5))
    _assert_same_store(reference.out, cfg.out)


def test_the_serial_path_writes_the_same_bytes_as_the_pipeline(inputs, reference):
    """The double-buffered pipeline (batch N+1 rendered on another thread while the teacher runs batch N,
    rows copied back without blocking, shards written on a thread) changes when work runs, not what it
    computes: the serial path (render, teacher, copy back, in turn) writes the same shard files byte for byte."""
    cfg = _config(inputs, "serial.zarr", overlap=False)
    run(cfg, teachers=TEACHERS_WITH_TINY)
    _assert_same_store(reference.out, cfg.out)
    markers = sorted((Path(cfg.out) / "dpal_progress").glob("*.json"))
    assert len(markers) == 5
    for marker in markers:  # each lists its shard's files with their sizes and CRC32Cs
        assert marker.read_text() == (Path(reference.out) / "dpal_progress" / marker.name).read_text()
        for entry in json.loads(marker.read_text())["files"].values():
            assert (Path(cfg.out) / entry["key"]).read_bytes() == (Path(reference.out) / entry["key"]).read_bytes()


def test_unmarked_shard_is_rewritten_from_scratch(inputs, reference, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(reference.out, copy)
    (copy / "dpal_progress" / "shard_000002.json").unlink()
    damaged = copy / "local" / "c" / "2" / "0" / "0" / "0"
    damaged.write_bytes(damaged.read_bytes()[:50])  # a write cut short by a crash
    summary = run(_config(inputs, str(copy)), teachers=TEACHERS_WITH_TINY)
    assert summary["computed_view_sets"] == 4
    _assert_same_store(reference.out, str(copy))


def test_rerun_detects_and_rewrites_a_damaged_shard(inputs, reference, tmp_path, capsys):
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(reference.out, copy)
    target = copy / "global" / "c" / "3" / "0" / "0"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x10  # one flipped bit inside a chunk
    target.write_bytes(bytes(data))
    store = open_store(copy)
    with pytest.raises(StoreError, match=rf"{target}: chunk .* is damaged .*re-running the `python -m cache_teacher run`"):
        for block in range(store.num_blocks):
            for view_set in range(store.views_per_image):
                store.read_block(block, view_set)
    assert main(_cli_args(_config(inputs, str(copy))), teachers=TEACHERS_WITH_TINY) == 0
    printed = capsys.readouterr()
    assert f"shard 3: global file {target} does not match its checksum; rewriting shard 3" in printed.err
    assert "5/5 shards done" in printed.out and "rewrote 1 damaged shard(s) [3]" in printed.out
    _assert_same_store(reference.out, str(copy))


@pytest.mark.e2e
def test_second_writer_of_a_store_is_refused_while_the_first_runs(inputs, reference):
    """Two real `run` processes on one --out: the second is refused in one line, before writing anything (it
    used to pass the existence check, skip the identity check and mix its shards in), whether or not the first
    has created the store yet; the first, stopped meanwhile, then finishes the same store as an undisturbed run."""
    cfg = _config(inputs, "contended.zarr")
    command = [sys.executable, str(inputs / "cli.py"), *_cli_args(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    lock = inputs / ".contended.zarr.lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        if lock.is_file() and lock.read_text().startswith(f"pid {first.pid} "):
            break
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)  # holds the lock, frozen at an arbitrary point of its run
    try:
        assert first.poll() is None, f"first run ended early: {first.stderr.read().decode()[-2000:]}"
        second = subprocess.run([*command, "--seed", "1"], capture_output=True, text=True, timeout=300, env=env)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert f"store {cfg.out} is being written by pid {first.pid} on " in second.stderr
    assert not list(inputs.glob("contended.zarr.creating-*"))
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-3000:]
    _assert_same_store(reference.out, cfg.out)


def test_verify_and_info(inputs, reference, tmp_path, capsys):
    passed, table = verify(reference.out, reference.weights, samples=4, teachers=TEACHERS_WITH_TINY)
    assert passed and {row["metric"] for row in table} >= {"global_cosine", "local_cosine", "relation_kl"}
    summary = info(reference.out)
    assert summary["shards_done"] == 5 and summary["compression_ratio"] > 1.0
    assert "bytes/view set" in capsys.readouterr().out.replace("B/view set", "bytes/view set")
    copy = tmp_path / "corrupt.zarr"
    shutil.copytree(reference.out, copy)
    target = copy / "relation" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert main(["verify", str(copy), "--weights", reference.weights], teachers=TEACHERS_WITH_TINY) == 1
    printed = capsys.readouterr().out
    assert "does not match its checksum" in printed and "verify: FAILED; repair the store by re-running" in printed
    images = tmp_path / "damaged.beton"  # every image is checked, not a sample of blocks
    data = bytearray((inputs / "persons.beton").read_bytes())
    start, size = ImageFile(inputs / "persons.beton").span(7)
    data[start + size // 2] ^= 0x01
    images.write_bytes(bytes(data))
    assert main(["verify", reference.out, "--weights", reference.weights, "--images", str(images)],
                teachers=TEACHERS_WITH_TINY) == 2
    assert f"error: {images}: 1 of {NUM_IMAGES} images are damaged" in capsys.readouterr().err


def test_int8_format_verifies(inputs):
    cfg = _config(inputs, "int8.zarr", target_format="int8", codec="zstd", shard_images=4, chunk_images=4,
                  limit_images=4)
    run(cfg, teachers=TEACHERS_WITH_TINY)
    store = open_store(cfg.out)
    assert store.arrays["local"].dtype == np.int8 and store.arrays["relation_scale"].shape == (4, 2, 257)
    assert store.attrs["codec"] == "zstd" and "zstd" in str(store.arrays["relation"].compressors)
    passed, table = verify(cfg.out, cfg.weights, samples=3, teachers=TEACHERS_WITH_TINY)
    worst = {row["metric"]: row["worst"] for row in table}
    assert passed and worst["local_error_steps"] <= 1.0 and worst["relation_kl"] < 1e-3  # log-domain relation codes


def test_no_progress_shows_no_progress_bar_not_even_calibrating(inputs, tmp_path, capsys):
    run(_config(inputs, str(tmp_path / "quiet.zarr"), limit_images=2, calibration_images=2), teachers=TEACHERS_WITH_TINY)
    assert "shape-mask calibration" not in capsys.readouterr().err
    run(_config(inputs, str(tmp_path / "shown.zarr"), limit_images=2, calibration_images=2, progress=True),
        teachers=TEACHERS_WITH_TINY)
    assert "shape-mask calibration" in capsys.readouterr().err


def test_no_mixing_and_bad_input(inputs, reference, tmp_path, capsys):
    for change, expected in [(dict(views_per_image=3), "views_per_image: store has 2, this run has 3"),
                             (dict(target_format="int8"), "target_format: store has 'float16'"),
                             (dict(seed=1), "seed: store has 0"),
                             (dict(codec="zstd"), "codec: store has 'lz4'"),
                             (dict(batch_size=4), "batch_size: store has 3, this run has 4"),
                             (dict(images=str(inputs / "backgrounds.beton")), "images_fingerprint")]:
        with pytest.raises(RunError, match=expected):
            run(_config(inputs, "reference.zarr", **change), teachers=TEACHERS_WITH_TINY)
    # Without --batch-size a resume adopts the store's batch size (here: nothing left to do).
    assert run(_config(inputs, "reference.zarr", batch_size=None), teachers=TEACHERS_WITH_TINY)[
        "computed_view_sets"] == 0
    other_weights = tmp_path / "other.pth"
    torch.manual_seed(1)
    torch.save(release_checkpoint(build_teacher(TINY)), other_weights)
    with pytest.raises(RunError, match="checkpoint_sha256"):
        run(_config(inputs, "reference.zarr", weights=str(other_weights)), teachers=TEACHERS_WITH_TINY)
    with pytest.raises(RunError, match="free on that disk"):
        run(_config(inputs, str(tmp_path / "huge.zarr"), views_per_image=10**7), teachers=TEACHERS_WITH_TINY)
    old = tmp_path / "old.zarr"
    shutil.copytree(reference.out, old)
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"]["dpal_store"]["format_version"] = 0
    (old / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="store format 0"):
        run(_config(inputs, str(old)), teachers=TEACHERS_WITH_TINY)
    # Spec v1 targets come from the old teacher position-embedding resize: no resume, no read, no verify.
    v1 = tmp_path / "v1.zarr"
    shutil.copytree(reference.out, v1)
    meta = json.loads((v1 / "zarr.json").read_text())
    meta["attributes"]["dpal_store"]["spec_version"] = 1
    (v1 / "zarr.json").write_text(json.dumps(meta))
    refusal = r"written under spec v1 \(old teacher position-embedding resize\).* `python -m cache_teacher run`"
    with pytest.raises(StoreError, match=refusal):
        run(_config(inputs, str(v1)), teachers=TEACHERS_WITH_TINY)
    with pytest.raises(StoreError, match=refusal):
        open_store(v1)
    capsys.readouterr()
    assert main(["verify", str(v1), "--weights", reference.weights], teachers=TEACHERS_WITH_TINY) == 2
    err = capsys.readouterr().err.strip()
    assert "spec v1" in err and "cache_teacher run" in err and "\n" not in err
    args = _cli_args(_config(inputs, str(tmp_path / "new.zarr")))
    bad = {"--views-per-image": ["-K", "0"], "--teacher": ["--teacher", "path-b"]}
    with pytest.raises(SystemExit):  # refused while the command line is read
        main(args + bad["--views-per-image"], teachers=TEACHERS_WITH_TINY)
    assert "-K: 0 is out of range: must be >= 1" in capsys.readouterr().err
    assert main(args + bad["--teacher"], teachers=TEACHERS_WITH_TINY) == 2  # tiny checkpoint is not PATH-B
    err = capsys.readouterr().err
    assert "path-b" in err and "missing" in err.lower()
    assert not (tmp_path / "new.zarr").exists()
    assert main(args + ["--images", str(tmp_path / "none.beton")], teachers=TEACHERS_WITH_TINY) == 2
    assert "does not exist" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root ignores permissions
            assert main(args + ["--out", str(locked / "s.zarr")], teachers=TEACHERS_WITH_TINY) == 2
            assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_the_view_configuration_comes_from_the_recipes(monkeypatch):
    """A store is cached with its teacher's recipes' views (--views names one when they differ); a teacher that
    no recipe uses gets the spec's default views."""
    assert cached_views("path-b") == RECIPES["path-b_vit-ti"].views and cached_views(TINY.name) == ViewConfig()
    with pytest.raises(RunError, match="--views path-l_vit-ti: that recipe distils path-l, not path-b"):
        cached_views("path-b", "path-l_vit-ti")
    other = dataclasses.replace(RECIPES["path-b_vit-s"], views=ViewConfig(gray_p=0.5))
    monkeypatch.setitem(RECIPES, "path-b_vit-s", other)
    with pytest.raises(RunError, match="name the one to cache with --views RECIPE"):
        cached_views("path-b")
    assert cached_views("path-b", "path-b_vit-s").gray_p == 0.5


def test_bench_compares_teacher_only_and_pipeline(inputs, tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", "--teacher", TINY.name, "--weights", str(inputs / "tiny.pth"), "--images",
                 str(inputs / "persons.beton"), "--backgrounds", str(inputs / "backgrounds.beton"), "--batch-size", "2",
                 "--iterations", "1", "--num-images", "2", "--format", "int8", "--json", str(report)],
                teachers=TEACHERS_WITH_TINY) == 0
    result = json.loads(report.read_text())
    assert result["teacher_only_view_sets_per_s"] > 0 and result["pipeline_view_sets"] == 4  # 2 images x K=2
    assert result["serial_view_sets_per_s"] > 0
    assert result["pipeline_fraction"] == pytest.approx(result["pipeline_view_sets_per_s"]
                                                        / result["teacher_only_view_sets_per_s"])
    assert "pipeline reaches" in capsys.readouterr().out


def test_dry_run_reports_path_b_storage(inputs, capsys):
    cfg = _config(inputs, "dry.zarr", teacher="path-b", dry_run=True, chunk_images=None, shard_images=None)
    summary = run(cfg)
    out = capsys.readouterr().out
    assert "local" in out and "relation" in out and "needs at most" in out
    per_set = VIEW_SET_FIELDS * 4 + 768 * 2 + 128 * 768 * 2 + 128 * 2 + 257 * 257 * 2
    assert summary["bytes"] == per_set * NUM_IMAGES * 2
    assert not (inputs / "dry.zarr").exists()


def _first_chunk_offset(shard_file: Path, chunks: int) -> int:
    """Byte offset of the first chunk in a shard file (index of `chunks` (offset, nbytes) pairs + CRC32C at the end)."""
    raw = shard_file.read_bytes()[-(16 * chunks + 4):-4]
    return int(np.frombuffer(raw, dtype="<u8").reshape(-1, 2)[0, 0])


def test_damaged_files_and_wrong_paths_are_one_line_naming_them(inputs, reference, tmp_path, capsys):
    def refused(argv) -> str:
        assert main(argv, teachers=TEACHERS_WITH_TINY) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("error: "), err
        return err.splitlines()[0]

    args = _cli_args(_config(inputs, str(tmp_path / "new.zarr")))
    for damaged in ("zarr.json", "local/zarr.json"):  # the group's and an array's metadata, cut short
        copy = tmp_path / f"truncated-{damaged.replace('/', '-')}.zarr"
        shutil.copytree(reference.out, copy)
        (copy / damaged).write_bytes((copy / damaged).read_bytes()[:40])
        assert str(copy / damaged) in refused(["info", str(copy)])
        assert str(copy / damaged) in refused(args[:args.index("--out") + 1] + [str(copy)] + args[args.index("--out") + 2:])
    a_file = tmp_path / "a-file"
    a_file.write_text("not a store")
    assert "is a file" in refused(args + ["--out", str(a_file)])
    assert "is a directory" in refused(args + ["--weights", str(tmp_path)])
    poisoned = torch.load(inputs / "tiny.pth", weights_only=True)
    weights = next(value for value in poisoned.values() if isinstance(value, dict))
    name = next(key for key in weights if key.endswith("blocks.1.mlp.fc1.weight"))
    weights[name][3, 5] = float("nan")
    torch.save(poisoned, tmp_path / "nan.pth")
    line = refused(args + ["--weights", str(tmp_path / "nan.pth")])
    assert "nan.pth" in line and "NaN" in line and "blocks.1.mlp.fc1.weight" in line
    assert not (tmp_path / "new.zarr").exists()

    # A damaged Blosc header in a shard file: the read names the file instead of a codec error.
    copy = tmp_path / "blosc.zarr"
    shutil.copytree(reference.out, copy)
    shard_file = copy / "global" / "c" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    offset = _first_chunk_offset(shard_file, chunks=2)  # shard of 2 images x K=2, chunks of 2 images x 1 set
    data[offset:offset + 16] = bytes(16)
    shard_file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=str(shard_file)):
        open_store(copy).read_block(0, 0)


@pytest.mark.e2e
def test_signals_stop_the_run_in_one_line_and_it_resumes_bit_identical(inputs, reference):
    cfg = _config(inputs, "signalled.zarr")
    command = [sys.executable, str(inputs / "cli.py"), *_cli_args(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    progress = Path(cfg.out) / "dpal_progress"
    for signum, shards in ((signal.SIGINT, 1), (signal.SIGTERM, 3)):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if progress.is_dir() and len(list(progress.glob("*.json"))) >= shards:
                break
            time.sleep(0.01)
        assert process.poll() is None, f"run ended before the signal: {process.stderr.read()[-2000:]}"
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 128 + signum, err
        assert "Traceback" not in err and err.splitlines()[-1] == (f"interrupted: stopped by {signal.Signals(signum).name}; finished shards of {cfg.out} "
                               f"are kept, rerun the same command to resume"), err
        assert len(list(progress.glob("*.json"))) < 5
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_store(reference.out, cfg.out)


def two_node_torchrun(port: int, command: list[str], env: dict, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Two `two_node_launcher`s running `command`, each to its end."""
    launcher = two_node_launcher(port, f"dpal-test-{port}")
    nodes = [subprocess.Popen(launcher + command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return results


@pytest.mark.e2e
def test_two_nodes_write_the_same_store_as_one_process(inputs, reference):
    cfg = _config(inputs, "two-nodes.zarr")
    nodes = two_node_torchrun(free_port(), [str(inputs / "cli.py"), *_cli_args(cfg)], dict(os.environ, OMP_NUM_THREADS="1"))
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    markers = [json.loads(p.read_text()) for p in sorted((Path(cfg.out) / "dpal_progress").glob("*.json"))]
    assert [m["shard"] for m in markers] == list(range(5))
    _assert_same_store(reference.out, cfg.out)


def test_a_file_name_that_is_not_utf8_is_printed_escaped(reference, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/store-\xff.zarr"))
    shutil.copytree(reference.out, odd)
    result = subprocess.run([sys.executable, "-m", "cache_teacher", "info", str(odd)], capture_output=True,
                            env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    assert b"store-\\udcff.zarr" in result.stdout
