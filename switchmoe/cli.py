"""How the entry points under experiments/ fail: one clear message, exit status 2, no traceback.

`run(main)` replaces absl's `app.run(main)`. A bad command line, config or workdir (an unknown
flag or config key, a missing config file, an unknown variant, a bad value, a workdir held by
another trainer or holding an incompatible or damaged checkpoint) prints `error: <what>` — the
setting, what was given, what is allowed, a suggestion for near-misses — and exits with status 2.
`--debug` (or SWITCHMOE_DEBUG=1) shows the traceback instead. Errors that are not the user's
(a bug, an out-of-memory) keep their traceback. A run stopped by SIGTERM or SIGINT after saving
the step it was on (switchmoe/training/preemption.py) prints `preempted: ...` and exits with
status 75 (PREEMPTED_EXIT); rerunning the same command resumes it. Library INFO logging (Orbax,
JAX) is off unless --debug, so every entry point prints only its own output.
"""

from __future__ import annotations

import difflib
import linecache
import os
import re
import sys
from typing import Callable, Optional

from absl import app, flags
from absl import logging as absl_logging

from switchmoe.config import default_config
from switchmoe.runs.integrity import DamagedCheckpoint
from switchmoe.runs.workdir_lock import WorkdirLocked
from switchmoe.training.preemption import PREEMPTED_EXIT, Preempted

USAGE_EXIT = 2
# What a user's input raises before anything trains (validation, config loading, the workdir).
# OSError covers a config file that cannot be loaded and a workdir that cannot be written.
USER_ERRORS = (ValueError, KeyError, AttributeError, OSError, WorkdirLocked, DamagedCheckpoint,
               app.UsageError)  # fmt: skip


def debugging(argv) -> bool:
    return "--debug" in argv or os.environ.get("SWITCHMOE_DEBUG", "") not in ("", "0")


def chain(error: BaseException) -> list[BaseException]:
    """The exception and those it was raised from, outermost first."""
    out = []
    while error is not None and all(error is not e for e in out):
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def innermost(error: BaseException) -> BaseException:
    """The exception that started a chain (config_flags wraps the config's own error)."""
    return chain(error)[-1]


# Where the project's own code lives: the package, and a checkout's configs and entry points.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_DIRS = tuple(
    os.path.join(_ROOT, d) + os.sep for d in ("switchmoe", "configs", "experiments")
)


def raised_by_project(error: BaseException) -> bool:
    """Whether a `raise` statement of the project's code raised `error` (its message is then
    the project's, written for the user), not the system or a library (an OSError from open()
    in the project's code counts as the system's: it is raised by the call, not a `raise`)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not filename.startswith(PROJECT_DIRS):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def message(error: BaseException) -> str:
    """An exception's text as written (a KeyError's str() is the repr of its key: quoted)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0].strip()
    return str(error).strip()


def _config_keys() -> set[str]:
    keys = set()

    def walk(node, prefix):
        for key, value in node.items():
            keys.add(prefix + key)
            if hasattr(value, "items"):
                walk(value, prefix + key + ".")

    walk(default_config(), "")
    return keys


def describe(error: BaseException, argv) -> str:
    """One paragraph for a user's error: the message of the outermost exception the project
    raised (else the innermost of the chain), with an OS error it was raised from as a second
    line."""
    inner = innermost(error)
    ours = next((e for e in chain(error) if raised_by_project(e)), None)
    text = message(ours or inner).replace("\\n", "\n")
    if isinstance(error, flags.UnrecognizedFlagError) or "Unknown command line flag" in str(error):
        name = getattr(error, "flagname", None) or _quoted(str(error))
        hint = ""
        if name:
            matches = [k for k in _config_keys() if k == name or k.endswith("." + name)]
            if matches:
                hint = f" Config settings are flags under --config.: did you mean --config.{matches[0]}?"
            else:
                close = difflib.get_close_matches(name, list(flags.FLAGS), n=1)
                hint = f" Did you mean --{close[0]}?" if close else ""
        return f"unknown flag --{name}.{hint}"
    near_miss = next((e for e in chain(error) if "Did you mean" in str(e)), None)
    if near_miss is not None and not isinstance(error, flags.UnrecognizedFlagError):
        # ml_collections: "'num_expert'\nDid you mean "num_experts" instead of "num_expert"?"
        text = str(near_miss).replace("\\n", "\n")
        key = re.search(r'instead of "([^"]+)"', text)
        key = key.group(1) if key else (_quoted(text) or "?")
        flag = next((a.split("=")[0] for a in argv if a.split("=")[0].endswith("." + key)), key)
        suggestion = re.search(r'Did you mean "([^"]+)"', text)
        return f"{flag}: no such setting" + (
            f"; did you mean {suggestion.group(1)}?" if suggestion else "."
        )
    if isinstance(error, flags.IllegalFlagValueError) and str(error).startswith("flag --"):
        # "flag --config.model.moe.num_experts=abc: invalid literal for int() ...": the flag and
        # what was wrong with its value.
        flag, _, problem = str(error)[len("flag ") :].partition(": ")
        if "config file" not in problem:
            return f"{flag}: {problem}"
    if "Failed loading config file" in str(error) or isinstance(inner, FileNotFoundError):
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
        path = path.split(":")[0]
        hint = f" Did you mean {path}.py?" if path and os.path.exists(path + ".py") else ""
        if path and not os.path.exists(path):
            return f"--config={path}: no such config file.{hint}"
    text = " ".join(text.split()) if "\n" in text and len(text) < 400 else text
    cause = None if ours is None else (ours.__cause__ or ours.__context__)
    if isinstance(cause, OSError) and (cause.strerror or message(cause)) not in text:
        text += f"\n  cause: {message(cause)}"
    return text


def _quoted(text: str) -> Optional[str]:
    match = re.search(r"'([^'\s]+)'", text)
    return match.group(1) if match else None


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    print("(run with --debug for the traceback)", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def run(main: Callable, known_only: bool = False) -> None:
    """absl's app.run(main) with the errors above reported in a line or two (exit status 2)."""
    debug = debugging(sys.argv)
    argv = [a for a in sys.argv if a != "--debug"]
    try:
        remaining = flags.FLAGS(argv, known_only=known_only)
    except Exception as e:  # noqa: BLE001  (flag and config-file errors of every kind)
        if debug:
            raise
        fail(describe(e, argv))

    def guarded(args):
        if not debug:
            # Library INFO lines (Orbax's every save and restore, JAX's backend probing) bury a
            # command's own output; --debug shows them again.
            absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            return main(args)
        except Preempted as e:  # saved and stopped on a signal: rerunning resumes
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT)
        except USER_ERRORS as e:
            if debug:
                raise
            fail(describe(e, argv))

    app.run(guarded, argv=argv, flags_parser=lambda _: remaining)
