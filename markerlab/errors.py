"""User-facing errors: one clear line, non-zero exit, no traceback.

Anything a user can cause (bad config, missing file, unknown persona, missing
model) raises `UserError`; the command-line entry points catch it in `cli_main`.
An OSError that reaches `cli_main` (a file or disk the user's environment got
wrong, named by the error itself) is reported the same way: one line, exit 2.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """An error the user can fix; its message names the key or file at fault."""

    exit_code = 2


class ProblemsError(UserError):
    """Every problem found in one file (a config, an experiment) at once: one line for one,
    an indented list for several. Subclasses name what the file is in `kind`."""

    kind = "file"

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            lines = "\n  ".join(problems)
            super().__init__(f"{source}: {len(problems)} problems in the {self.kind}:\n  {lines}")


def cli_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)` and turn a UserError (or an OSError) into one line on stderr and exit code 2."""
    try:
        rc = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `... | head`: the reader left early, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    sys.exit(rc or 0)
