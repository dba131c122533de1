"""The one exception type stages raise for bad input, and the CLI wrapper that reports it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


class DepthpipeError(Exception):
    """A user-facing error: bad params, a bad input file, a missing output of an earlier stage.

    The message names the param or file and says what is wrong; no traceback is shown for it.
    """


class ConfigError(DepthpipeError):
    """A value in params.yaml is unknown, of the wrong type or out of range."""


# 128 + SIGTERM's number: what a shell reports for a process the signal ended.
TERMINATED_STATUS = 143


class Terminated(BaseException):
    """The stage was sent SIGTERM (a job's time limit, scancel): it stops without publishing.

    A BaseException like KeyboardInterrupt, so no ``except Exception`` swallows it and every
    staged output is removed on the way out (depthpipe.atomic).
    """


def reason(error: BaseException, path: Path) -> str:
    """``error``'s message with ``path`` shortened to its name (PIL quotes the whole path): the
    reasons go into DVC outputs, which must not depend on where the project folder is."""
    return str(error).replace(str(path), path.name)


def run_cli(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; a DepthpipeError becomes one line on stderr and exit status 2.
    The project lock a stage took in cli.open_project is let go as ``main`` ends."""
    try:
        try:
            main()
        finally:
            # Imported here: depthpipe.distributed imports this module.
            from depthpipe.distributed import release_stage_lock

            release_stage_lock()
    except DepthpipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: partial outputs were removed", file=sys.stderr)
        sys.exit(130)
    except Terminated as stop:
        # Non-zero: a launcher script must not go on to record (dvc commit) what was not made.
        print(f"terminated: {stop}", file=sys.stderr)
        sys.exit(TERMINATED_STATUS)
