"""scripts/system_deps.sh, which `make test` runs first: present -> silent; missing -> installed with apt-get when
root on Debian/Ubuntu, else one line saying what to install and a non-zero exit (so the tests never start).

Each case runs the script with PATH reduced to a scratch bin folder (no Chromium there, whatever this machine
has), a fake user id and os-release (the script's test hooks), and a fake apt-get that logs its arguments and
"installs" a fake chromium into that folder.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "system_deps.sh"
DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nID=debian\n'
UBUNTU = 'NAME="Ubuntu"\nID=ubuntu\nID_LIKE=debian\n'
MINT = 'NAME="Linux Mint"\nID=linuxmint\nID_LIKE="ubuntu debian"\n'
FEDORA = 'NAME="Fedora Linux"\nID=fedora\n'


def _executable(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def box(tmp_path):
    """A scratch bin folder (the only PATH entry), the apt-get log and a helper that runs the script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"

    def fake_apt(installs: bool = True) -> None:
        fake = bin_dir / "chromium"
        make = f'printf "#!/bin/bash\\n" > {fake} && /bin/chmod +x {fake}' if installs else "exit 100"
        _executable(bin_dir / "apt-get", f'echo "$@" >> {log}\nif [[ "$1" == install ]]; then {make}; fi\n')

    def run(*deps: str, euid: int, os_release: str | None, **env) -> subprocess.CompletedProcess:
        osr = tmp_path / "os-release"
        if os_release is None:
            osr.unlink(missing_ok=True)
        else:
            osr.write_text(os_release)
        full_env = {"PATH": str(bin_dir), "SYSDEPS_EUID": str(euid), "SYSDEPS_OS_RELEASE": str(osr), **env}
        return subprocess.run(["/bin/bash", str(SCRIPT), *deps], env=full_env, capture_output=True, text=True,
                              timeout=60)

    return {"bin": bin_dir, "log": log, "fake_apt": fake_apt, "run": run}


def _one_line_saying_what_to_install(res: subprocess.CompletedProcess) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert "Chromium" in lines[0] and "apt-get install -y chromium" in lines[0], lines[0]


def test_present_dependency_is_silent(box):
    _executable(box["bin"] / "chromium", "")
    box["fake_apt"]()
    res = box["run"]("chromium", euid=0, os_release=DEBIAN)
    assert res.returncode == 0 and res.stderr == "" and res.stdout == ""
    assert not box["log"].exists()  # nothing installed


def test_proxygap_chromium_counts_as_present(box, tmp_path):
    exe = _executable(tmp_path / "my-chrome", "")
    res = box["run"]("chromium", euid=1000, os_release=FEDORA, PROXYGAP_CHROMIUM=str(exe))
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("os_release", [DEBIAN, UBUNTU, MINT], ids=["debian", "ubuntu", "mint"])
def test_root_on_debian_installs_with_apt(box, os_release):
    box["fake_apt"]()
    res = box["run"]("chromium", euid=0, os_release=os_release)
    assert res.returncode == 0, res.stderr
    calls = box["log"].read_text().splitlines()
    assert calls[0].startswith("update") and calls[1].split()[-1] == "chromium" and "-y" in calls[1].split()
    assert (box["bin"] / "chromium").is_file()


@pytest.mark.parametrize("euid, os_release", [(1000, DEBIAN), (0, FEDORA), (0, None), (1000, FEDORA)],
                         ids=["not-root-on-debian", "root-on-fedora", "root-without-os-release", "neither"])
def test_otherwise_one_line_says_what_to_install(box, euid, os_release):
    box["fake_apt"]()
    res = box["run"]("chromium", euid=euid, os_release=os_release)
    _one_line_saying_what_to_install(res)
    assert not box["log"].exists()  # apt-get never called


def test_root_on_debian_without_apt_get_says_what_to_install(box):
    _one_line_saying_what_to_install(box["run"]("chromium", euid=0, os_release=DEBIAN))


def test_failed_apt_install_stops_with_the_hint(box):
    box["fake_apt"](installs=False)
    res = box["run"]("chromium", euid=0, os_release=DEBIAN)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert "could not install chromium" in last and "apt-get install -y chromium" in last, res.stderr


SLURM_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo",
                  "srun")


def test_slurm_needs_every_daemon_and_client(box):
    """One program short is missing Slurm: root on Debian installs the four packages; else one line names them."""
    for name in SLURM_PROGRAMS[:-1]:
        _executable(box["bin"] / name, "")
    res = box["run"]("slurm", euid=1000, os_release=DEBIAN)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Slurm and munge" in res.stderr and "apt-get install -y slurmctld slurmd slurm-client munge" in res.stderr
    _executable(box["bin"] / "apt-get", f'echo "$@" >> {box["log"]}\n'
                f'if [[ "$1" == install ]]; then printf "#!/bin/bash\\n" > {box["bin"]}/srun; '
                f'/bin/chmod +x {box["bin"]}/srun; fi\n')
    res = box["run"]("slurm", euid=0, os_release=DEBIAN)
    assert res.returncode == 0, res.stderr
    assert box["log"].read_text().splitlines()[1].split()[-4:] == ["slurmctld", "slurmd", "slurm-client", "munge"]
    assert box["run"]("slurm", euid=1000, os_release=FEDORA).returncode == 0  # all present: silent, anywhere


def test_unknown_dependency_is_a_usage_error(box):
    res = box["run"]("slurmd-typo", euid=0, os_release=DEBIAN)
    assert res.returncode == 2 and "unknown dependency 'slurmd-typo'" in res.stderr


def test_make_test_runs_the_check_before_the_tests():
    """The Makefile's test target depends on the check (listed before the venv, so it fails fast)."""
    make = subprocess.run(["make", "-n", "-p", "test"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "MAKEFLAGS": ""}, timeout=60)
    rules = {line.split(":")[0]: line.split(":", 1)[1].split() for line in make.stdout.splitlines()
             if line.startswith(("test:", "system-deps:"))}
    assert rules["test"][0] == "system-deps", rules
    assert "bash scripts/system_deps.sh chromium slurm" in make.stdout
    assert "make test" in (REPO / ".ci" / "run").read_text()
