"""A throw-away two-node SLURM cluster on this machine, run from a temporary folder.

Debian's SLURM is built with ``MULTIPLE_SLURMD``: two ``slurmd -N n1`` / ``-N n2`` daemons
on one host, each on its own port, form a real two-node cluster. Everything (munge key
and socket, state, spool, logs, ``slurm.conf``) lives in the folder; ``SLURM_CONF``
points every SLURM command at it. The daemons run in the foreground as children of the
test process and are stopped by the process ids started here. See the SLURM section of
``shared/docs/infra-notes.md`` for why each setting is there.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pgm_dist.common.distributed import free_ports

PACKAGES = "slurmctld slurmd slurm-client munge"
INSTALL_HINT = f"the SLURM tests need Debian's SLURM: sudo apt-get install -y {PACKAGES}"
NODES = ("n1", "n2")
HOSTS_LINE = "127.0.0.1 " + " ".join(NODES)
# A second partition over the same nodes whose jobs preempt the default partition's (PreemptMode=REQUEUE:
# SLURM signals the preempted job, gives it GraceTime to save, and requeues it itself).
URGENT = "urgent"


def missing() -> str | None:
    """Why the cluster cannot start here (None when it can)."""
    absent = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(tool) is None
              and not Path("/usr/sbin", tool).exists()]
    if absent:
        return f"{', '.join(absent)} not found; {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the throw-away SLURM cluster runs its daemons as root (SlurmUser=root); run the tests as root"
    return None


def _ensure_node_names_resolve() -> None:
    """submitit sets MASTER_ADDR to the first node name: the tasks must resolve it."""
    try:
        socket.gethostbyname(NODES[0])
    except OSError:
        with open("/etc/hosts", "a") as hosts:
            hosts.write(HOSTS_LINE + "\n")


def _config(folder: Path, ctld_port: int, node_ports: list[int]) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 State=UNKNOWN"
                      for name, port in zip(NODES, node_ports))
    return f"""\
ClusterName=pgmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket,cred_expire=10
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=bf_interval=5,sched_interval=5
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName={URGENT} Nodes={",".join(NODES)} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


class SlurmCluster:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "SlurmCluster":
        _ensure_node_names_resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "state").mkdir(exist_ok=True)
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        self.conf.write_text(_config(self.folder, ctld_port, node_ports))
        log = open(self.folder / "daemons.log", "ab")
        self._spawn(["munged", "--foreground", "--force", f"--key-file={key}",
                     f"--socket={self.folder}/munge.socket", f"--pid-file={self.folder}/munged.pid",
                     f"--log-file={self.folder}/munged.log", f"--seed-file={self.folder}/munged.seed"], log)
        self._wait(lambda: (self.folder / "munge.socket").exists(), "munged")
        self._spawn(["slurmctld", "-D", "-c", "-i"], log)
        self._wait(lambda: self.run("scontrol", "ping", check=False, timeout=5).stdout.count("UP") > 0,
                   "slurmctld")
        for name in NODES:
            self._spawn(["slurmd", "-D", "-N", name], log)
        self._wait(lambda: self.idle_nodes() == set(NODES), "slurmd n1/n2 (idle)")
        return self

    def _spawn(self, cmd: list[str], log) -> None:
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log))

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} did not start; logs in {self.folder}")

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def idle_nodes(self) -> set[str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10).stdout.split()
        return {name for name, state in zip(out[::2], out[1::2]) if state == "idle"}

    def job_ids(self) -> set[str]:
        """Every job the controller knows, finished ones included (MinJobAge keeps them)."""
        return set(self.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split())

    def job_field(self, job_id: str, field: str) -> str:
        """One ``scontrol show job`` field, e.g. ``JobState`` or ``Restarts``."""
        text = self.run("scontrol", "show", "job", job_id, "-o").stdout
        return next(item.split("=", 1)[1] for item in text.split() if item.startswith(field + "="))

    def controller_log(self, job_id: str) -> str:
        """slurmctld's log lines about ``job_id`` (for a failing test's message: who requeued it, when)."""
        try:
            lines = (self.folder / "slurmctld.log").read_text(errors="replace").splitlines()
        except OSError as err:
            return f"(no slurmctld log: {err})"
        mentions = re.compile(rf"\bJob_?Id={job_id}\b", re.IGNORECASE)
        return "\n".join(line for line in lines if mentions.search(line))

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(1)
        raise AssertionError(f"job {job_id} still {state} after {timeout} s (wanted {states})")

    def stop(self) -> None:
        # A job left running (a failed test) would outlive the daemons in its slurmstepd processes.
        active = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if active:
            self.run("scancel", *active, check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", "-o", "%i", check=False).stdout.split() and time.monotonic() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
