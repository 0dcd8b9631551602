"""The two kinds of failure a user sees, and the exit code each gives.

Every error of the project's own derives from one of them, so the `unclip` command can say any of
them in one line: bad input or configuration (exit 2: fix the input, run again), or a job that
failed on the way (exit 1: what is committed is kept, run again to resume). A base module: it
imports nothing of ours.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or configuration; the message names the file, row or key and what was expected."""

    exit_code = 2


class StorageUnavailable(Exception):
    """The object store kept failing (5xx, resets, timeouts) after every retry its client allows.
    Not an OSError: nothing may take an outage for a missing or malformed file; not a JobFailed
    either, whose message says what is kept: this one names the URL and the operation."""

    exit_code = 1


class JobFailed(RuntimeError):
    """A job that could not finish; the message says what is kept and how to go on."""

    exit_code = 1
