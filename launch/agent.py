"""torchrun for `unclip train` on this machine: `python -m launch.agent [torchrun's arguments]`.

torchrun's own agent, unchanged, except that a finished launch exits as our commands do (after the
exit handlers, without the interpreter's teardown: models/base/process.py), which costs
every training launch half a second otherwise. A failed launch raises as torchrun does.
Multi-node launches keep `python -m torch.distributed.run`, the command their users know.
"""

from __future__ import annotations

from torch.distributed.run import main

from models.base.process import exit_now

if __name__ == "__main__":
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    exit_now(code)
