"""Command-line plumbing shared by every command of both stages, importable without torch (so that
`--help` answers at once): the seed and device argument types, the options that
change how a teacher checkpoint is loaded, and the top-level handler that turns user errors and
interrupting signals into one line and an exit status.
"""
from __future__ import annotations

import argparse
import errno
import logging
import math
import signal
import sys

from dpal.arguments import (NON_NEGATIVE, POSITIVE, integer, output_file, output_folder, real,  # noqa: F401 (re-exported)
                            usable_cores, worker_count)
from dpal.config import TeacherSpec
from dpal.errors import UserError

# Defaults shown by `--help`; owned here so the parsers need neither zarr nor FFCV nor torch (the store's own
# names and defaults are the schema's, `formats.schema`).
DEFAULT_MAX_SIDE = 512  # pack: longest side kept
DEFAULT_JPEG_QUALITY = 95  # pack: quality of re-encoded images
MAX_SEED = 2**32 - 1
# Exit status of a command stopped by a signal: the shell's convention, 128 + signal number.
INTERRUPT_STATUS = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


# ------------------------------------------------------------------------------ argument types
# (the range and output-path types live in dpal.arguments, shared with the kernel tools)

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


# ------------------------------------------------------------------------------ logging

LOG = logging.getLogger("dpal")


def setup_logging() -> None:
    """What the commands log (INFO and up, `dpal.*` loggers) as plain timestamped lines on stderr; a program that
    configured logging itself keeps its own configuration."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")


def note_adjusted(option: str, asked, used, reason: str) -> None:
    """The one notice for a value the command cuts or adjusts: a WARNING naming the option, both values and why."""
    if asked != used:
        LOG.warning(f"{option} {asked} -> {used}: {reason}")


# ------------------------------------------------------------------------------ config files

NOT_CONFIGURABLE = {"help", "config", "print_config", "list_recipes", "resume"}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE and --print-config (read by `parse_with_config`)."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of option values, keyed by the option names (batch-size: 64, or "
                             "batch_size; switches take true/false, e.g. progress: false); options given on the "
                             "command line override it. An earlier run's run.json is accepted as it is")
    parser.add_argument("--print-config", action="store_true",
                        help="print the options this command would run with (YAML, usable as --config) and exit")


class ConfigError(UserError):
    """A config file or mapping with an unknown key or a value its option refuses."""


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str], *, read_record=None,
                      options_parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)` with the values of --config FILE as defaults of `options_parser` (default `parser`;
    a subcommand's parser). A bad file, key or value is one line naming it and what is accepted (exit 2)."""
    options_parser = options_parser or parser
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    found, _ = finder.parse_known_args(argv)
    if found.config:
        try:
            set_config_defaults(options_parser, read_config_file(found.config), read_record,
                                source=f"--config {found.config}")
        except ConfigError as exc:  # one line, without the usage block parser.error would print first
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return parser.parse_args(argv)


def read_config_file(path: str) -> dict:
    """The mapping in a YAML or JSON file (.json: JSON; anything else: YAML, of which JSON is a part)."""
    import json

    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError: where the syntax breaks
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise ConfigError(f"--config {path}: not valid {kind}: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: holds a {type(data).__name__}, not a mapping of option names to values")
    return data


def set_config_defaults(parser: argparse.ArgumentParser, data: dict, read_record=None, *, source: str) -> dict:
    """Check `data` ({option name: value}) against `parser` and make its values the parser's defaults (a value given
    this way satisfies a required option); returns them by dest. Every key must be one of the parser's options and
    every value passes that option's own type, range and choices, else ConfigError naming `source`, the key and
    what is accepted. `read_record(data)` may turn a recognised record (a run.json) into option values, or return
    None for an ordinary mapping."""
    record = read_record(data) if read_record is not None else None
    actions = {action.dest: action for action in parser._actions if action.dest not in NOT_CONFIGURABLE
               and action.option_strings}
    # A key is an option's dest, or the long name of an option that takes a value (--format for target_format);
    # a switch's --no-x name is not a key (its value would read inverted).
    names = {**{option[2:].replace("-", "_"): action for action in actions.values() if action.nargs != 0
                for option in action.option_strings if option.startswith("--")}, **actions}
    values = {}
    for key, value in (record if record is not None else data).items():
        action = names.get(str(key).lstrip("-").replace("-", "_"))
        if action is None:
            accepted = ", ".join(sorted(dest.replace("_", "-") for dest in actions))
            raise ConfigError(f"{source}: unknown key {key!r}; accepted: {accepted}")
        values[action.dest] = _config_value(action, value, f"{source}: {key}")
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    parser.set_defaults(**values)
    return values


def _config_value(action: argparse.Action, value, where: str):
    """`value` for option `action` as the command line would have parsed it."""
    if value is None:
        return None
    if action.nargs == 0:  # a switch: store_true / store_false / --x/--no-x
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not true or false")
        return value
    if isinstance(value, (dict, list, bool)):
        raise ConfigError(f"{where}: {value!r} is not a single value")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def config_text(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The options of `args` as YAML for --config (what --print-config prints)."""
    import yaml

    options = {action.dest.replace("_", "-"): getattr(args, action.dest) for action in parser._actions
               if action.option_strings and action.dest not in NOT_CONFIGURABLE and hasattr(args, action.dest)}
    return yaml.safe_dump(options, sort_keys=False)


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
