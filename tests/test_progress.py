"""Progress inside a unit reaches the runner: the unit's bars mirror their count to ``$PROXYGAP_PROGRESS`` (drawn or
not, throttled), and the runner shows the running units' files in its bar, or as one line a minute in a log."""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout
from pathlib import Path

from proxygap_helpers import progress
from proxygap_helpers.cli import _ProgressWatch
from proxygap_helpers.grid import Unit


def test_bars_mirror_their_count_drawn_or_not(tmp_path, monkeypatch):
    f = tmp_path / "progress.json"
    monkeypatch.setenv(progress.ENV, str(f))
    for disable in (True, False):
        f.unlink(missing_ok=True)
        for _ in progress.tqdm(range(7), desc="evaluate L1 x 2 SAE(s)", disable=disable, file=io.StringIO()):
            pass
        assert progress.describe(f) == "evaluate L1 x 2 SAE(s) 7/7"
        bar = progress.tqdm(total=1200, desc="train large: 2 SAE runs, steps", disable=disable, file=io.StringIO())
        bar.update(340)
        bar.close()
        assert progress.describe(f) == "train large: 2 SAE runs, steps 340/1,200"


def test_a_drawn_bar_that_refreshes_as_it_goes_is_counted_once(tmp_path, monkeypatch):
    """tqdm's own loop calls update() when it redraws: those steps are not counted a second time."""
    f = tmp_path / "progress.json"
    monkeypatch.setenv(progress.ENV, str(f))
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    seen = []
    for _ in progress.tqdm(range(50), desc="extract large", mininterval=0, miniters=1, file=io.StringIO()):
        seen.append(progress.describe(f))
    assert progress.describe(f) == "extract large 50/50"
    assert all(int(s.split()[-1].split("/")[0]) <= 50 for s in seen if s), seen


def test_writes_are_throttled(tmp_path, monkeypatch):
    f = tmp_path / "progress.json"
    monkeypatch.setenv(progress.ENV, str(f))
    writes = []
    monkeypatch.setattr(progress, "write_json_atomic", lambda path, rec: writes.append(rec["n"]))
    bar = progress.tqdm(total=10_000, desc="steps", disable=True)
    for _ in range(10_000):
        bar.update()
    bar.close()
    assert writes[0] == 1 and writes[-1] == 10_000, "the first update and the close are written"
    assert len(writes) < 10, "between them, at most one write every EVERY_S seconds"


def test_without_the_variable_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    for _ in progress.tqdm(range(3), disable=True):
        pass
    assert list(tmp_path.iterdir()) == []
    assert progress.describe(tmp_path / "missing.json") is None


def test_the_runner_logs_running_units_once_a_minute(tmp_path, monkeypatch):
    out = tmp_path / "out"
    unit = Unit("sae-large-1of1-abc", "sae", ("02_train",), {})
    rd = unit.run_dir(out)
    rd.mkdir(parents=True)
    monkeypatch.setenv(progress.ENV, str(rd / progress.FILE))
    (rd / progress.FILE).write_text('{"desc": "stale", "n": 1, "total": 2}')
    old = time.time() - 3600
    import os

    os.utime(rd / progress.FILE, (old, old))
    monkeypatch.setattr(_ProgressWatch, "POLL_S", 0.05)
    monkeypatch.setattr(_ProgressWatch, "LOG_S", 0.0)
    buf = io.StringIO()
    with redirect_stdout(buf):
        watch = _ProgressWatch(out, [unit], bar=None, interactive=False, t0=time.time())
        time.sleep(0.3)
        assert "stale" not in buf.getvalue(), "an earlier run's leftover file is not shown"
        bar = progress.tqdm(total=100, desc="train large: 4 SAE runs, steps", disable=True)
        bar.update(25)
        bar.close()
        time.sleep(0.3)
        watch.stop()
    lines = [ln for ln in buf.getvalue().splitlines() if ln]
    assert lines and all(ln.startswith("[progress") for ln in lines)
    assert "sae-large-1of1-abc: train large: 4 SAE runs, steps 25/100" in lines[-1]


def test_the_runner_shows_them_in_its_bar(tmp_path, monkeypatch):
    out = tmp_path / "out"
    unit = Unit("extract-abc", "extract", ("01_extract",), {})
    f = unit.run_dir(out) / progress.FILE
    f.parent.mkdir(parents=True)
    monkeypatch.setattr(_ProgressWatch, "POLL_S", 0.05)

    class Bar:
        postfix = ""

        def set_postfix_str(self, s, refresh=True):
            self.postfix = s
    bar = Bar()
    watch = _ProgressWatch(out, [unit], bar=bar, interactive=True, t0=time.time() - 1)
    f.write_text('{"desc": "extract large", "n": 3, "total": 8}')
    time.sleep(0.3)
    watch.stop()
    assert bar.postfix == "extract-abc: extract large 3/8"
    assert Path(f).is_file()
