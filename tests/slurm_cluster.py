"""A single-node Slurm cluster for the tests: Debian's munge and slurm-wlm run as root from one temporary folder
(its own munge key and socket, slurm.conf, state, spool and logs), CPU only, on free ports, so that it never meets
a cluster the machine may already run. Install the daemons once (`.ci/run` does):

    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge

`LocalSlurm(folder).start()` returns when the node takes jobs; `stop()` cancels the cluster's jobs and ends the
three daemons it started, by their process ids.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "srun")


def unavailable() -> str | None:
    """Why a cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "the single-node Slurm cluster runs its daemons as root"
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install -y slurmctld slurmd slurm-client munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.conf = self.dir / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        node = subprocess.run([_daemon("slurmd"), "-C"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]  # NodeName=HOST CPUs=... RealMemory=...
        self.node = node.split()[0].split("=")[1]
        self.conf.write_text("\n".join([
            "ClusterName=gatelab-test", f"SlurmctldHost={self.node}", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"AuthInfo=socket={d / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "ReturnToService=2", "KillWait=2", "MinJobAge=600", "SchedulerType=sched/backfill",
            node, "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))

    def _start_munge(self) -> None:
        m = self.dir / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        os.chmod(m, 0o700)
        self.procs["munged"] = subprocess.Popen(
            [_daemon("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={m / 'munge.socket'}",
             f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait(lambda: (m / "munge.socket").exists(), 20, "munged did not create its socket")

    def start(self, timeout: float = 90) -> "LocalSlurm":
        self._write_config()
        self._start_munge()
        for name in ("slurmctld", "slurmd"):
            log = open(self.dir / "log" / f"{name}.out", "w")
            self.procs[name] = subprocess.Popen([_daemon(name), "-D", "-f", str(self.conf)] +
                                                (["-i"] if name == "slurmctld" else []),
                                                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._wait(self._node_idle, timeout, "the node did not become idle")
        return self

    def _node_idle(self) -> bool:
        r = self.run("sinfo", "--noheader", "--format=%t")
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        t0 = time.time()
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() - t0 > timeout:
                ended = f"; ended: {', '.join(dead)}" if dead else ""
                raise RuntimeError(f"{what} (after {time.time() - t0:.0f} s{ended}); logs in {self.dir / 'log'}:\n"
                                   f"{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n" + f.read_text()[-2000:] for f in sorted((self.dir / "log").glob("*")))

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=30)

    def jobs(self) -> list[str]:
        r = self.run("squeue", "--noheader", "--array", "--format=%i")
        return r.stdout.split() if r.returncode == 0 else []

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", *self.jobs()) if self.jobs() else None
            t0 = time.time()
            while self.jobs() and time.time() - t0 < 20:
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
