"""Progress inside a unit, for the runner: the unit's progress bars mirror themselves to ``runs/<unit>/progress.json``.

``executors.run_unit`` names that file in ``$PROXYGAP_PROGRESS`` before the unit's kernel starts; every bar made with
:class:`tqdm` below (a drop-in for ``tqdm.auto.tqdm``: the engine's training bar, evaluation's bars) writes
``{"desc", "n", "total", "at"}`` there at most every :data:`EVERY_S` seconds and when it closes, whether it
draws itself or not (under the runner it does not: the notebook's output is not shown). The runner reads the files
of its running units (:func:`describe`) into its own progress bar, or into one log line a minute when its output
is not a terminal. Without ``$PROXYGAP_PROGRESS`` (a notebook run by hand, nbval) the bars are plain tqdm bars.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm as _tqdm

from .files import write_json_atomic

ENV = "PROXYGAP_PROGRESS"
FILE = "progress.json"
EVERY_S = 5.0


class tqdm(_tqdm):  # noqa: N801 - a drop-in for tqdm.auto.tqdm
    """``tqdm.auto.tqdm`` that also writes its count to ``$PROXYGAP_PROGRESS`` (throttled), drawn or not."""

    def __init__(self, iterable=None, *args, **kwargs):
        super().__init__(iterable, *args, **kwargs)
        # (a disabled tqdm keeps neither its description nor the iterable's length: kept here)
        self._file, self._desc = os.environ.get(ENV), kwargs.get("desc") or ""
        self._count, self._written = kwargs.get("initial", 0), 0.0
        self._total = kwargs.get("total") or (len(iterable) if hasattr(iterable, "__len__") else None)

    def __iter__(self):
        for item in super().__iter__():
            yield item
            if self.disable:  # (a drawn bar counts in its own loop and calls update() as it refreshes)
                self._count += 1
                self._maybe_write()

    def update(self, n: float = 1):
        out = super().update(n)
        self._count = self._count + n if self.disable else self.n
        self._maybe_write()
        return out

    def close(self):
        if getattr(self, "_file", None) and not getattr(self, "_closed_once", False):
            self._closed_once = True
            if not self.disable:
                self._count = self.n
            self._write()
        super().close()

    def _maybe_write(self) -> None:
        if self._file and time.monotonic() - self._written >= EVERY_S:
            self._write()

    def _write(self) -> None:
        self._written = time.monotonic()
        try:
            write_json_atomic(Path(self._file), {"desc": self._desc, "n": self._count, "total": self._total,
                                                  "at": time.time()})
        except OSError:  # progress is best effort: never fail a unit over it
            pass


def describe(path: Path) -> str | None:
    """One short phrase from a unit's progress file (``'large: 2 SAE runs 340/1,200'``), None when there is none
    or it cannot be read."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    n, total = int(rec.get("n") or 0), rec.get("total")
    count = f"{n:,}/{int(total):,}" if total else f"{n:,}"
    return f"{rec.get('desc') or 'working'} {count}".strip()
