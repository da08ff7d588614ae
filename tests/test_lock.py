"""The lock installs on any machine: public versions only (a local label such as ``+cpu`` exists on no public index,
so ``pip install -c requirements.lock`` failed off the machine that made it), and it agrees with pyproject's pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.lock: {line!r} is not an exact pin"
            pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


def test_the_lock_pins_public_versions_only():
    pins = _lock()
    assert len(pins) > 100 and "torch" in pins
    local = {name: v for name, v in pins.items() if Version(v).local is not None or "+" in v}
    assert not local, f"local version labels are on no public index: {local}"


def test_pyproject_pins_agree_with_the_lock():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = _lock()
    for text in reqs:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact and name in pins:
            assert re.sub(r"\+.*", "", exact[0]) == pins[name], f"{text} vs requirements.lock {name}=={pins[name]}"
