"""Both command lines, without running anything: numeric options are refused at parse time with their range,
every option explains itself, and `--help` imports neither torch nor zarr nor FFCV (so it answers at once)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from cache_teacher.__main__ import cache_parser
from cache_teacher.__main__ import main as cache_main
from dpal.recipes import TEACHERS
from train_student.__main__ import main as train_main
from train_student.__main__ import training_parser
from train_student.bench import parser as train_bench_parser

RUN = ["run", "--teacher", "path-b", "--weights", "w.pth", "--images", "i.beton", "--backgrounds", "b.beton",
       "-K", "2", "--out", "s.zarr"]
TRAIN = ["--recipe", "path-b_vit-ti", "--store", "s.zarr", "--images", "i.beton", "--backgrounds", "b.beton",
         "--out", "run"]
BENCH = ["bench", "--recipe", "path-b_vit-ti", "--store", "s.zarr", "--images", "i.beton", "--backgrounds", "b.beton",
         "--feed-only"]

CACHE_CASES = [
    (["pack", "src", "out.beton", "--jpeg-quality", "200"], "--jpeg-quality: 200 is out of range: must be 1..100"),
    (["pack", "src", "out.beton", "--jpeg-quality", "0"], "--jpeg-quality"),
    (["pack", "src", "out.beton", "--workers", "0"], "--workers: 0 is out of range: must be >= 1"),
    (["pack", "src", "out.beton", "--max-side", "8"], "--max-side: 8 is out of range: must be >= 16"),
    (RUN[:-4] + ["-K", "0", "--out", "s.zarr"], "-K: 0 is out of range"),
    (RUN + ["--seed", "-1"], "--seed: -1 is out of range"),
    (RUN + ["--batch-size", "0"], "--batch-size: 0 is out of range"),
    (RUN + ["--calibration-images", "-3"], "--calibration-images: -3 is out of range"),
    (RUN + ["--chunk-images", "0"], "--chunk-images"),
    (RUN + ["--limit-images", "0"], "--limit-images"),
    (RUN + ["--device", "foo"], "--device: 'foo' is not a device"),
    (RUN + ["--semantic-weight", "nan"], "--semantic-weight: nan is not a finite number"),
    (RUN + ["--batch-size", "two"], "--batch-size: 'two' is not an integer"),
    (["verify", "s.zarr", "--weights", "w.pth", "--samples", "0"], "--samples: 0 is out of range: must be >= 1"),
    (["demo-data", "out", "--persons", "-1"], "--persons: -1 is out of range: must be >= 1"),
    (["bench", "--teacher", "path-b", "--weights", "w", "--images", "i", "--backgrounds", "b", "--iterations", "0"],
     "--iterations"),
]
TRAIN_CASES = [
    (TRAIN + ["--batch-size", "0"], "--batch-size: 0 is out of range"),
    (TRAIN + ["--batch-size", "-4"], "--batch-size: -4 is out of range"),
    (TRAIN + ["--epochs", "0"], "--epochs: 0 is out of range"),
    (TRAIN + ["--epochs", "3", "--warmup-epochs", "4"], "warm-up (4 epochs) is longer than the run (3 epochs)"),
    (TRAIN + ["--epochs", "5"], "warm-up (10 epochs) is longer than the run (5 epochs)"),  # the recipe's warm-up
    (TRAIN + ["--accum-steps", "0"], "--accum-steps: 0 is out of range"),
    (TRAIN + ["--seed", "-1"], "--seed: -1 is out of range"),
    (TRAIN + ["--workers", "-1"], "--workers: -1 is out of range"),
    (TRAIN + ["--window-images", "-1"], "--window-images: -1 is out of range"),
    (TRAIN + ["--checkpoint-every", "-1"], "--checkpoint-every: -1 is out of range"),
    (TRAIN + ["--weight-decay", "-0.05"], "--weight-decay: -0.05 is out of range"),
    (TRAIN + ["--calibration-images", "-1"], "--calibration-images: -1 is out of range"),
    (TRAIN + ["--max-steps", "0"], "--max-steps: 0 is out of range: must be >= 1"),
    (TRAIN + ["--lr", "nan"], "--lr: nan is not a finite number"),
    (TRAIN + ["--lr", "0"], "--lr: 0 is out of range: must be > 0"),
    (TRAIN + ["--blr", "inf"], "--blr: inf is not a finite number"),
    (TRAIN + ["--min-lr=-1e-6"], "--min-lr: -1e-06 is out of range: must be >= 0"),
    (BENCH + ["--steps", "0"], "--steps: 0 is out of range"),
    (BENCH + ["--warmup-steps", "-1"], "--warmup-steps: -1 is out of range"),
    (BENCH + ["--feed-workers", "0"], "--feed-workers: 0 is out of range"),
    (BENCH + ["--batch-size", "0"], "--batch-size: 0 is out of range"),
]


@pytest.mark.parametrize("argv, message", [(["cache"] + a, m) for a, m in CACHE_CASES]
                         + [(["train"] + a, m) for a, m in TRAIN_CASES])
def test_numeric_options_are_refused_at_parse_time(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not into the checkout
    main = cache_main if argv[0] == "cache" else train_main
    with pytest.raises(SystemExit) as stopped:
        main(argv[1:])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []


def test_cuda_device_without_a_gpu_is_refused_at_parse_time(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --device cuda is valid here")
    with pytest.raises(SystemExit):
        cache_main(RUN + ["--device", "cuda"])
    assert "--device: cuda: no CUDA device is visible" in capsys.readouterr().err


def _parsers():
    cache = cache_parser(TEACHERS)
    commands = next(a for a in cache._actions if isinstance(a, argparse._SubParsersAction))
    return {**{f"cache_teacher {name}": p for name, p in commands.choices.items()},
            "train_student": training_parser(), "train_student bench": train_bench_parser()}


@pytest.mark.parametrize("command", list(_parsers()))
def test_every_option_has_a_help_line_with_its_range(command):
    parser = _parsers()[command]
    bare = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not bare, f"{command}: options without help: {bare}"
    for action in parser._actions:  # a numeric option states its range in its help line
        if getattr(action.type, "__name__", "").startswith(("integer", "number")):
            range_text = action.type.__name__.split(" ", 1)[1]
            assert range_text in action.help, (command, action.dest, range_text, action.help)


@pytest.mark.parametrize("argv", [["cache_teacher", "--help"], ["cache_teacher", "run", "--help"],
                                  ["cache_teacher", "verify", "--help"], ["train_student", "--help"],
                                  ["train_student", "bench", "--help"], ["kernels.bench", "--help"],
                                  ["kernels.sweep", "--help"]])
def test_help_imports_no_heavy_module(argv):
    """`--help` must answer at once: torch alone takes seconds to import (measured in the README)."""
    probe = ("import runpy, sys\n"
             f"sys.argv = {argv!r}\n"
             "try:\n"
             f"    runpy.run_module({argv[0]!r}, run_name='__main__')\n"
             "except SystemExit as stop:\n"
             "    assert stop.code == 0, stop.code\n"
             "heavy = sorted(m for m in ('torch', 'triton', 'zarr', 'ffcv', 'timm', 'cv2') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env=_as_a_user_starts_it())
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-500:]


def _as_a_user_starts_it() -> dict:
    """The environment without the test session's kernel-mode choice (TRITON_INTERPRET), as a shell has it."""
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def test_trainer_chooses_the_kernel_mode_before_triton_is_imported(tmp_path):
    """Started without TRITON_INTERPRET, the trainer makes its choice before the teacher options import timm
    (and with it triton): a missing input is then its one-line error, not a traceback about the kernel mode."""
    missing = tmp_path / "missing"
    result = subprocess.run([sys.executable, "-m", "train_student", "--recipe", "path-b_vit-ti", "--device", "cpu",
                             "--store", f"{missing}.zarr", "--images", f"{missing}.beton",
                             "--backgrounds", f"{missing}_bg.beton", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=_as_a_user_starts_it())
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "missing.beton" in result.stderr, result.stderr[-2000:]
