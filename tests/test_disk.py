"""Real disk failures, not simulated ones: a filesystem that fills up mid-run and a run folder
the user may not write. Each stops the run with one error line; once space or permission is
back, `evomerge resume` finishes with nothing lost."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main

from .test_run import cli, run_config, stored, write

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def allocated(folder: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs of its own (mounting needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("evomerge: error:")]


def test_a_disk_that_fills_up_mid_run(llama, tmp_path, small_disk, capsys):
    budget = 24
    config = write(tmp_path, run_config(llama, budget=budget))
    reference = tmp_path / "uninterrupted"
    assert main(["run", str(config), "--out", str(reference), "--quiet"]) == 0
    early = tmp_path / "early"
    assert main(["run", str(write(tmp_path, run_config(llama, budget=2), "early.yaml")),
                 "--out", str(early), "--quiet"]) == 0  # fmt: skip
    # leave room for a 2-evaluation run plus a few more evaluations, then fill the rest
    stat = os.statvfs(small_disk)
    room = allocated(early) + 48 * 1024
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - room))
    run = small_disk / "run"
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "database or disk is full" in lines[0], lines
    assert f"evomerge resume {run}" in lines[0]
    committed = stored(run)
    assert 2 <= len(committed) < budget, len(committed)
    print("committed before the disk filled:", len(committed))
    assert not list((run / "checkpoints").glob(".*tmp*"))  # no half-written checkpoint holds space
    filler.unlink()  # space is back
    assert main(["resume", str(run), "--quiet"]) == 0
    final = stored(run)
    assert final[: len(committed)] == committed  # nothing committed was lost or rewritten
    assert final == stored(reference)  # and the run is the one it would have been


def without_dac_override() -> None:
    """In the child: give up the capabilities that let root ignore file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def evomerge(*args: str) -> tuple[int, str]:
    """The CLI as an ordinary user would meet permissions (root gives up its override):
    exit status and stderr."""
    proc = cli(*args, text=True, preexec_fn=without_dac_override if os.geteuid() == 0 else None)
    _, err = proc.communicate()
    return proc.returncode, err


def set_writable(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


def test_a_run_folder_without_write_permission(llama, tmp_path):
    if os.geteuid() == 0:
        try:
            subprocess.run([sys.executable, "-c", ""], preexec_fn=without_dac_override, check=True)
        except subprocess.SubprocessError:
            pytest.skip("cannot drop root's permission override here (no CAP_SETPCAP)")
    config = write(tmp_path, run_config(llama, budget=4))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, err = evomerge("run", str(config), "--out", str(locked / "run"))
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "Permission denied" in lines[0], err
    assert str(locked / "run") in lines[0] and not any(locked.iterdir())

    run = tmp_path / "run"
    assert evomerge("run", str(config), "--out", str(run))[0] == 0
    before = stored(run)
    raw = yaml.safe_load((run / "run.yaml").read_text())
    raw["budget"] = 8
    (run / "run.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    set_writable(run, False)
    try:
        code, err = evomerge("resume", str(run))
    finally:
        set_writable(run, True)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "cannot write the run store" in lines[0] and f"evomerge resume {run}" in lines[0]
    assert stored(run) == before  # nothing lost
    assert evomerge("resume", str(run))[0] == 0
    after = stored(run)
    assert len(after) == 8 and after[:4] == before
