"""Run `evomerge run` and die like a SIGKILL (os._exit: no cleanup, no finally) just before
its K-th durable step: a file or folder written, renamed or copied, a study created, a score or
an evaluation committed. Exits 0 when the run finishes first, 99 when it died; K = 0 runs to
the end and prints the steps' names, in order, as its last line (JSON).

    python -m tests.crash_points K CONFIG OUT
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import sys

DIED = 99


def arm(limit: int) -> list[str]:
    seen: list[str] = []

    def counted(fn, name):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            seen.append(name)
            if limit and len(seen) >= limit:
                os._exit(DIED)
            return fn(*args, **kwargs)

        return wrapper

    import optuna

    from evomerge.results.store import RunStore

    for owner, name in (
        (pathlib.Path, "write_text"),
        (pathlib.Path, "write_bytes"),
        (pathlib.Path, "mkdir"),
        (pathlib.Path, "replace"),
        (os, "replace"),
        (shutil, "copy2"),
        (optuna, "create_study"),
        (optuna.study.Study, "set_user_attr"),
        (RunStore, "commit"),
        (RunStore, "set_source"),
        (RunStore, "set_baseline"),
        (RunStore, "set_held_out"),
        (RunStore, "save_checkpoint"),
    ):
        setattr(owner, name, counted(getattr(owner, name), name))
    return seen


def main() -> int:
    limit, config, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    from evomerge.cli import main as cli

    seen = arm(limit)
    code = cli(["run", config, "--out", out, "--quiet"])
    print(json.dumps(seen))
    return code


if __name__ == "__main__":
    sys.exit(main())
