"""Command-line argument types that refuse bad values at parse time, for every command of the project (the two
stages, the kernel tools, the acceptance scripts): numbers within a range, and output files whose folder exists
and can be written, so that a command never runs for minutes before failing on its own options.

Light on purpose (argparse and os only): `--help` answers at once.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def integer(low: int | None = None, high: int | None = None):
    """argparse `type=`: an int within [low, high] (either bound may be open); its __name__ names the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {describe}")
        return value

    describe = _range_text(low, high)
    parse.__name__ = f"integer {describe}"
    return parse


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False):
    """argparse `type=`: a finite float within [low, high] (`low_open`: low itself excluded)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value:g} is out of range: must be {describe}")
        return value

    describe = _range_text(low, high, low_open=low_open)
    parse.__name__ = f"number {describe}"
    return parse


def _range_text(low, high, *, low_open: bool = False) -> str:
    lo, hi = (f"{x:g}" if isinstance(x, float) else str(x) for x in (low, high))
    if low is not None and high is not None:
        return f"{lo}..{hi}" if not low_open else f"in ({lo}, {hi}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {lo}"
    return f"<= {hi}" if high is not None else "any value"


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
MAX_SEED = 2**32 - 1
SEED = integer(0, MAX_SEED)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a batch job's share of the machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(text: str) -> int:
    """argparse `type=`: a number of worker threads or processes, 1 up to the usable cores (more would only
    wait for each other, and some libraries fail on them)."""
    cores = usable_cores()
    try:
        return integer(1, cores)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (this machine gives this process {cores} CPU cores)") from None


def output_file(text: str) -> str:
    """argparse `type=`: a file the command will write at its end (a JSON report, a PNG): its folder must exist
    and be writable, and the path must not be a folder, checked before any work starts."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path inside it")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: folder {folder} does not exist; create it first or choose "
                                         f"another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text}: cannot be written here (permission denied); choose another path")
    return text


def output_folder(text: str) -> str:
    """argparse `type=`: a folder the command creates or fills: not a file, and its nearest existing ancestor
    writable, checked before any work starts."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder; choose a folder path")
    existing = next(parent for parent in (path, *path.absolute().parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot be created or written under {existing} (permission "
                                         f"denied or not a folder); choose another path")
    return text


def backbone_name(known, role: str, timm_prefix: str):
    """argparse `type=`: a teacher or student name, one of `known` (a mapping read when the command line is
    parsed, so names registered in code count) or `timm_prefix` + NAME; timm checks NAME when the model is
    built, as timm is too heavy to import for --help."""
    def parse(text: str) -> str:
        if text in known or (text.startswith(timm_prefix) and len(text) > len(timm_prefix)):
            return text
        raise argparse.ArgumentTypeError(f"unknown {role} {text!r}; accepted: {', '.join(known)}, or "
                                         f"{timm_prefix}NAME for a timm ViT or Swin (e.g. "
                                         f"{timm_prefix}vit_small_patch16_224)")

    parse.__name__ = role
    return parse


def recipe_name(published, separator: str):
    """argparse `type=`: a recipe name, one of `published` or TEACHER`separator`STUDENT (checked when the
    recipe is composed, which needs timm)."""
    def parse(text: str) -> str:
        if text in published or separator in text.strip(separator):
            return text
        raise argparse.ArgumentTypeError(f"unknown recipe {text!r}; accepted: {', '.join(published)}, or "
                                         f"TEACHER{separator}STUDENT (or --teacher with --student)")

    parse.__name__ = "recipe"
    return parse
