"""The exception types a user of flexorch sees.

`UserError`: bad input (job, prompts, model files). The CLI prints its message as one line on
stderr and exits with status 2; the Python API raises it (a ValueError). `JobFailed`: a failure
while running (a worker died, hung or failed), named in the message: the CLI exits 1.
Anything else is an internal failure (traceback kept in the log).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of the CLI and of worker processes, one list for both sides."""

    OK = 0
    FAILED = 1  # JobFailed; a worker that failed
    INVALID = 2  # UserError
    ORPHANED = 3  # a worker whose controller went away (its death pipe closed)
    INTERRUPTED = 130  # 128 + SIGINT
    TERMINATED = 143  # 128 + SIGTERM

    @classmethod
    def stopped_by(cls, interrupt: KeyboardInterrupt) -> ExitCode:
        """Ctrl-C, or SIGTERM (Terminated, unwound as Ctrl-C is)."""
        return cls.TERMINATED if isinstance(interrupt, Terminated) else cls.INTERRUPTED


class UserError(ValueError):
    """Bad input, named in the message (file, key, line or layer at fault)."""


class JobFailed(RuntimeError):
    """A job stopped by a failure while running; committed rounds are kept for a resume."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (workers stopped, report written), with exit status 143."""
