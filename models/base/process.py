"""How our command-line processes end once their work is done and reported.

A process that imported torch, DeepSpeed and diffusers spends 1-2 s after its last line tearing
its interpreter down (freeing every module and torch's C++ state), time nobody waits for and that
every `unclip` command and every training rank paid again. Here the exit handlers still run
(logging flushes, temporary folders go, Ray shuts down, weakref finalizers), the standard streams
are flushed, and the process leaves without that teardown. Only a `__main__` may call it: a caller
in-process (a test, a notebook) keeps its interpreter.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_now(code: int | None) -> NoReturn:
    """Exit with `code` (None is 0) after the exit handlers, skipping the interpreter's teardown."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say on it
            pass
    os._exit(code or 0)
