"""A one-node Slurm cluster for the tests: munge, slurmctld and slurmd from Debian's packages, run as root,
with everything they use (munge key and socket, slurm.conf, spool, state, logs) in one temporary directory.

- ``ensure_installed()`` raises ``NotAvailable`` with one line saying what to do when not root or when a
  program is missing (``make test`` installs Debian's ``slurmctld slurmd slurm-client munge`` beforehand with
  ``scripts/system_deps.sh slurm``).
- ``SlurmCluster(root).start()`` writes a minimal slurm.conf: this machine as its only node (``slurmd -C``: its
  CPUs and memory), one partition ``proxygap``, ``select/cons_tres`` with cores as the consumable resource,
  ``proctrack/linuxproc`` and ``task/none`` (no cgroups), no accounting. The daemons listen on free ports of
  127.0.0.1, so several test sessions on one machine do not meet. Clients reach this cluster only through
  ``cluster.env`` (``SLURM_CONF``).
- ``stop()`` cancels every job, ends the three daemons it started (by pid: SIGTERM, then SIGKILL), then ends
  by pid every process that still carries this cluster's marker variable in its environment. slurmd
  starts the job steps and passes the marker on, and so do the launchers that the tests start with
  ``cluster.env``; the tests' own processes never carry it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo",
            "srun")  # as scripts/system_deps.sh have_slurm
INSTALL_HINT = f"as root: apt-get update && apt-get install -y {' '.join(PACKAGES)}"
MARKER = "PROXYGAP_TEST_SLURM"
PARTITION = "proxygap"


class NotAvailable(RuntimeError):
    """Slurm is not installed or cannot start here; the message says what to do."""


def which(name: str) -> str | None:
    """``name`` on PATH, or in /usr/sbin or /sbin (not on a non-root PATH)."""
    return shutil.which(name) or next((str(d / name) for d in (Path("/usr/sbin"), Path("/sbin"))
                                       if (d / name).is_file()), None)


def _missing() -> list[str]:
    return [p for p in PROGRAMS if which(p) is None]


def ensure_installed() -> None:
    """Raise ``NotAvailable`` (one line: what to do) unless root with every program at hand.

    ``make test`` installs the packages first (``scripts/system_deps.sh slurm``: apt-get when root on
    Debian/Ubuntu, else one line saying what to install), so this fires only when pytest runs on its own.
    """
    need = f"; {', '.join(_missing())} missing: run `bash scripts/system_deps.sh slurm` ({INSTALL_HINT})" \
        if _missing() else ""
    if os.geteuid() != 0:
        raise NotAvailable(f"the Slurm tests start munged, slurmctld and slurmd and must run as root{need}")
    if need:
        raise NotAvailable(f"the Slurm tests need Slurm and munge{need}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, ok, timeout: float, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while not ok():
        if time.time() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log and log.exists() else ""
            where = f"; log {log}:\n{tail}" if tail else ""
            raise NotAvailable(f"{what} did not happen within {timeout:.0f}s{where}")
        time.sleep(0.2)


class SlurmCluster:
    """One controller and one compute node on this machine, all state under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """Variables that point Slurm's clients (and the jobs they submit) at this cluster."""
        return {"SLURM_CONF": str(self.conf), MARKER: str(self.root)}

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.logs / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **self.env}, start_new_session=True)
        log.close()

    def _alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        munge, spool, state = self.root / "munge", self.root / "spool", self.root / "state"
        for d in (munge, spool, state, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.root, munge):
            d.chmod(0o755)  # munged wants its socket directory reachable, not writable, by others
        key, sock = munge / "munge.key", munge / "munge.sock"
        subprocess.run([which("mungekey"), "--create", f"--keyfile={key}", "--bits=1024"], check=True, timeout=30)
        self._start("munged", [which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={munge / 'munged.pid'}", f"--log-file={self.logs / 'munged.log'}",
                               f"--seed-file={munge / 'munged.seed'}"])
        _wait("munged creating its socket", lambda: sock.exists() or not self._alive("munged"), timeout,
              self.logs / "munged.out")
        if not self._alive("munged"):
            raise NotAvailable(f"munged exited: {(self.logs / 'munged.out').read_text()[-500:]}")
        node = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, timeout=30, check=True)
        hardware = node.stdout.splitlines()[0]  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
        self.node = hardware.split()[0].split("=", 1)[1]
        self.conf.write_text("\n".join([
            "ClusterName=proxygaptest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={sock}",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "KillWait=2",  # seconds between SIGTERM and SIGKILL when a task is cancelled or times out
            "MinJobAge=600",  # squeue keeps ended tasks (and their state) for 10 min
            "SchedulerType=sched/builtin",
            f"{hardware} NodeAddr=127.0.0.1 State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self._start("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)])
        self._start("slurmd", [which("slurmd"), "-D", "-f", str(self.conf)])

        def idle() -> bool:
            for name in ("slurmctld", "slurmd"):
                if not self._alive(name):
                    raise NotAvailable(f"{name} exited: {(self.logs / f'{name}.out').read_text()[-800:]}")
            res = self.run("sinfo", "--noheader", "--Node", "--format=%T", timeout=10)
            return res.returncode == 0 and res.stdout.strip() == "idle"

        _wait("the Slurm node becoming idle", idle, timeout, self.logs / "slurmctld.log")
        return self

    def jobs(self) -> list[str]:
        """Job ids of every task this controller still has queued or running."""
        res = self.run("squeue", "--noheader", "--array", "--format=%i")
        return res.stdout.split() if res.returncode == 0 else []

    def marked_processes(self) -> list[int]:
        """Pids of live processes whose environment carries this cluster's marker (started through it)."""
        mine = {os.getpid(), os.getppid()}
        needle = f"{MARKER}={self.root}".encode() + b"\0"
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in mine:
                continue
            try:
                if needle in (d / "environ").read_bytes() + b"\0":
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    def stop(self, timeout: float = 30) -> list[int]:
        """Cancel every job, end the daemons, then any process still marked; return the pids that had to be
        killed after the daemons were gone (normally none)."""
        if self.procs.get("slurmctld") and self._alive("slurmctld"):
            if self.jobs():
                self.run("scancel", f"--partition={PARTITION}")
                deadline = time.time() + timeout
                while self.jobs() and time.time() < deadline:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        leftovers = self.marked_processes()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers

