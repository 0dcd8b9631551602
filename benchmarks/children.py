"""What the scale benchmarks share: each measurement in a fresh process, so peaks do not mix."""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator


def run_child(script: str, *args: str) -> dict:
    """`script --child ARGS` in a new interpreter; its last stdout line, as JSON."""
    out = subprocess.run([sys.executable, script, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss() -> int:
    """This process's peak resident memory, in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def scratch(workdir: str | None, prefix: str) -> Iterator[str]:
    """`workdir` if given (kept), else a temporary folder removed at the end."""
    path = workdir or tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        if not workdir:
            shutil.rmtree(path, ignore_errors=True)


def save_report(path: str | None, report: dict) -> None:
    if path:
        from models.base import storage  # lazy: the scale scripts put the repository on sys.path first

        storage.write_json(path, report)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The scale benchmarks' command line: their own flags go on this one."""
    parsed = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parsed.add_argument("--workdir", default=None, help="keep the generated data here (default: a temporary folder)")
    parsed.add_argument("--json", default=None, help="write the figures here")
    parsed.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parsed
