"""The output-directory lock, with real processes: racers, a SIGKILLed holder, foreign and live lock files.

(The runner-level lock behaviour, exit code 2 and nothing written, is in test_runner.py.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from proxygap_helpers.runlock import LockError, RunLock

REPO = Path(__file__).resolve().parents[1]

# A process that waits for a common start time, tries the lock, reports, and holds it for `hold` seconds.
RACER = textwrap.dedent("""
    import sys, time
    from proxygap_helpers.runlock import LockError, RunLock
    out, start, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))
    try:
        with RunLock(out):
            print("won", flush=True)
            time.sleep(hold)
    except LockError as e:
        print("refused", e, flush=True)
""")


def racers(out: Path, n: int, hold: float = 1.5) -> list[str]:
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(start), str(hold)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    return [o.strip().splitlines()[-1] for o, _ in outs]  # the last line: a stale-lock note may precede it


@pytest.mark.parametrize("round_", range(3))
def test_simultaneous_runners_exactly_one_wins(tmp_path, round_):
    if round_ == 1:  # a stale file of a dead process is there too: still exactly one winner
        (tmp_path / ".proxygap.lock").write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname()}))
    results = racers(tmp_path, 6)
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1, results
    assert all(r.startswith("refused another runner") for r in results if not r.startswith("won")), results
    assert not (tmp_path / ".proxygap.lock").exists()  # released by the winner


def test_sigkilled_holder_does_not_block_and_is_reported_stale(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), "0", "300"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "won"
        with pytest.raises(LockError, match=rf"pid {holder.pid} on {socket.gethostname()}"):
            RunLock(tmp_path).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / ".proxygap.lock").read_text())["pid"] == holder.pid  # left behind
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".proxygap.lock").read_text())["pid"] == os.getpid()
    assert f"stale lock of dead process {holder.pid}" in capsys.readouterr().out
    assert not (tmp_path / ".proxygap.lock").exists()


@pytest.mark.parametrize("who", ["live pid here", "other host"])
def test_lock_files_of_runners_that_may_be_alive_are_respected(tmp_path, who):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        info = {"pid": sleeper.pid, "host": socket.gethostname() if who == "live pid here" else "elsewhere.invalid",
                "start": "earlier"}
        (tmp_path / ".proxygap.lock").write_text(json.dumps(info))
        with pytest.raises(LockError, match=rf"pid {sleeper.pid} on {info['host']}, started earlier"):
            RunLock(tmp_path).__enter__()
        assert json.loads((tmp_path / ".proxygap.lock").read_text()) == info  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_is_reentrant_across_sequential_runs(tmp_path):
    for _ in range(3):
        with RunLock(tmp_path) as lock:
            assert lock.fd is not None
            assert json.loads((tmp_path / ".proxygap.lock").read_text())["pid"] == os.getpid()
        assert not (tmp_path / ".proxygap.lock").exists()
