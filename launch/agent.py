"""torchrun for `unclip train` and `unclip launch train --backend torchrun`: `python -m launch.agent
[torchrun's arguments]`.

torchrun's own agent, unchanged, except in how a launch ends. A finished one exits as our commands
do (after the exit handlers, without the interpreter's teardown: models/base/process.py), which
costs every training launch half a second otherwise. A failed one does not end in torchrun's
traceback and failure table (some hundred lines, whose last says no more than "ChildFailedError"):
what the agent knows, each failed rank's exit code or signal and this host's name, goes to the
RANK_ERRORS folder of the `unclip` command that started it, which says it in one line with what
the ranks said (launch/rank_failures.py); started by hand, the agent prints that line itself.
"""

from __future__ import annotations

import os
import sys
import tempfile

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import main

from launch.rank_failures import RANK_ERRORS, failures_of, summary, write_agent_failures
from models.base.process import exit_now


def failed(err: ChildFailedError | RendezvousError) -> int:
    failures = failures_of(err) if isinstance(err, ChildFailedError) else []
    error = None if failures else f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    folder = os.environ.get(RANK_ERRORS)
    if folder and os.path.isdir(folder):
        write_agent_failures(folder, failures, error)
        return 1
    stage = sys.argv[sys.argv.index("--stage") + 1] if "--stage" in sys.argv[:-1] else "?"
    with tempfile.TemporaryDirectory(prefix="unclip-agent-") as alone:
        write_agent_failures(alone, failures, error)
        line, code = summary(stage, alone) or (f"train {stage}: {error}", 1)
    print(f"error: {line}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    try:
        main()
        code = 0
    except SystemExit as done:
        code = 1 if isinstance(done.code, str) else done.code
    except (ChildFailedError, RendezvousError) as err:
        code = failed(err)
    exit_now(code)
