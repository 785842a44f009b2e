"""Command-line plumbing shared by every command of both stages, importable without torch (so that
`--help` answers at once): argument types that check numeric ranges at parse time, the options that
change how a teacher checkpoint is loaded, and the top-level handler that turns user errors and
interrupting signals into one line and an exit status.
"""
from __future__ import annotations

import argparse
import errno
import math
import signal
import sys

from dpal.config import TeacherSpec
from dpal.errors import UserError

# Defaults shown by `--help`; owned here so the parsers need neither zarr nor FFCV nor torch.
DEFAULT_MAX_SIDE = 512  # pack: longest side kept
DEFAULT_JPEG_QUALITY = 95  # pack: quality of re-encoded images
DEFAULT_CALIBRATION_IMAGES = 256  # images whose first view set calibrates the shape mask
TARGET_FORMATS = ("float16", "int8", "compact")  # store target formats
# Knobs of the compact format (`formats.targets.CompactKnobs`): the bits its values may take, and the size a
# view set is held to when the token rank is not given (the largest multiple of TOKEN_RANK_STEP that fits).
TOKEN_BITS = (8, 16)
RELATION_BITS = (4, 8, 16)
DEFAULT_VIEW_SET_BYTES = 64 << 10
TOKEN_RANK_STEP = 32
CODECS = ("lz4", "zstd")  # lossless Blosc codecs of a store
MAX_SEED = 2**32 - 1
# Exit status of a command stopped by a signal: the shell's convention, 128 + signal number.
INTERRUPT_STATUS = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


# ------------------------------------------------------------------------------ numeric argument types

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
SEED = integer(0, MAX_SEED)


def device_name(text: str) -> str:
    """argparse `type=` for --device: 'cpu', 'cuda' or 'cuda:N', and the CUDA device must exist."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    if kind == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible on this machine (use cpu)")
        if index and int(index) >= count:
            raise argparse.ArgumentTypeError(f"{text}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return text


# ------------------------------------------------------------------------------ teacher-loading options

def add_teacher_option_arguments(parser: argparse.ArgumentParser) -> None:
    """--solider-weights / --semantic-weight, for every command that loads a teacher."""
    parser.add_argument("--solider-weights", choices=("teacher", "student"), default="teacher",
                        help="SOLIDER-B only: which weights of the checkpoint to use, 'teacher' (default, as "
                        "SOLIDER's own tools) or 'student' (what the original DPAL used)")
    parser.add_argument("--semantic-weight", type=real(0.0, 1.0), default=0.0, metavar="S",
                        help="SOLIDER-B only: semantic weight s in 0..1 folded into the weights (default 0.0, "
                        "as the original DPAL)")


def parse_teacher_options(parser: argparse.ArgumentParser, args: argparse.Namespace, teacher: TeacherSpec) -> dict:
    """The validated `load_teacher` options for this teacher; a usage error (exit 2) when they do not apply."""
    from dpal.teachers import teacher_options

    try:
        return teacher_options(teacher, solider_weights=args.solider_weights, semantic_weight=args.semantic_weight)
    except ValueError as exc:
        parser.error(str(exc))


# ------------------------------------------------------------------------------ one line per failure

class Interrupted(Exception):
    """SIGINT / SIGTERM stopped a command; the message says what was kept and how to continue."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def _ignore_signals() -> None:
    for signum in INTERRUPT_STATUS:
        signal.signal(signum, signal.SIG_IGN)


def os_error_line(exc: OSError) -> str:
    """An OSError as one line that names the file (and, for a full disk, says what to do)."""
    where = f"{exc.filename}: " if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += "; free space and run the command again"
    return f"{where}{reason}"


def exit_status(work, *, stop_message: str | None = None) -> int:
    """Run a command's work(): its status (None: 0); a `UserError` or an OSError (missing or unwritable path,
    full disk, ...) becomes one line on stderr and status 2; a stopping signal, one line and 128 + its number.

    With `stop_message`, SIGINT and SIGTERM raise `Interrupted` (SIGTERM would otherwise kill silently, SIGINT
    print a traceback), the message saying what was kept; `work` may install its own handlers (training
    defers the stop to a step boundary). The previous handlers are restored on return, so that a caller in
    the same process (a test) and the processes it forks later are not affected."""
    previous = {signum: signal.getsignal(signum) for signum in INTERRUPT_STATUS}
    if stop_message is not None:
        def stop(signum, frame):
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}{stop_message}")

        for signum in INTERRUPT_STATUS:
            signal.signal(signum, stop)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed escaped, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return work() or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        _ignore_signals()  # already stopping: a further signal (torchrun stopping the other ranks) changes nothing
        print(f"interrupted: {exc}", file=sys.stderr)
        return INTERRUPT_STATUS[exc.signum]
    except KeyboardInterrupt:
        _ignore_signals()
        print("interrupted: stopped by SIGINT", file=sys.stderr)
        return INTERRUPT_STATUS[signal.SIGINT]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
