"""The entry points' one `--config` flag (an ml_collections config file), with one-line errors.

absl and ml_collections report a bad `--config.field` as a 50-line traceback (an unknown field) or a
usage dump (a value of the wrong type). `run(main, help)` parses the flags itself and turns every such
mistake into one `error: ...` line with exit status 2, keeping ml_collections' "did you mean" hint.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence


def flag_error(e: BaseException) -> str:
    """One line for an exception raised while parsing config flags."""
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...)) from ml_collections
        e = e.args[0]
    text = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    first, *rest = [line.strip() for line in text.splitlines() if line.strip()] or [type(e).__name__]
    if isinstance(e, KeyError):  # ml_collections: "'name'" then "Did you mean ...?"
        first = f"no config field {first}"
    return "; ".join([first, *rest])


def parse_flags(argv: Sequence[str], flag_values=None) -> list[str]:
    """absl's flag parsing (`app.run`'s flags_parser) with every flag mistake as one line and exit 2."""
    from absl import flags  # noqa: PLC0415
    try:
        return (flag_values or flags.FLAGS)(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        print(f"error: {flag_error(e)}", file=sys.stderr)
        sys.exit(2)


def run(main: Callable[[list[str]], None], help: str) -> None:
    """Define the required `--config` flag (a config file, unlocked) and run `main` under absl."""
    from absl import app, flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415
    config_flags.DEFINE_config_file("config", None, help, lock_config=False)
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
