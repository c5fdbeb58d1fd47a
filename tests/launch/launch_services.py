"""Batch-system daemons for the launcher tests, started by hand in a temp
dir (there is no systemd here): munged + slurmctld + slurmd.

Facts these rely on (measured, see the project's launcher notes): every
Slurm client command needs SLURM_CONF; a node may advertise more CPUs than
the machine has only with SlurmdParameters=config_overrides; the spool dir
must exist before slurmd starts; batch_sched_delay=0,sched_min_interval=0
bring submit→running to about a second.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 10.0):
    """SIGTERM, then SIGKILL after `timeout`."""
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, 9)


def munge_works() -> bool:
    return subprocess.run(["munge", "-n"], capture_output=True).returncode == 0


class Slurm:
    """One slurmctld and one slurmd (node `pxnode`, `cpus` CPUs) on
    127.0.0.1 with ports of their own, all state under `base`."""

    def __init__(self, base: Path, cpus: int = 32):
        self.base = base
        self.cpus = cpus
        self.conf = base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started_munge = False
        self.pids: list[int] = []

    def run(self, *cmd, check=True, timeout=30) -> subprocess.CompletedProcess:
        r = subprocess.run(list(map(str, cmd)), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def start(self):
        b = self.base
        for d in ("state", "log", "spool/pxnode", "tmp/pxnode"):
            (b / d).mkdir(parents=True, exist_ok=True)
        if not munge_works():
            run_dir = Path("/run/munge")
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.chown(run_dir, "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
            self.started_munge = True
            wait_for(munge_works, 10, "munged")
        host = socket.gethostname()
        self.conf.write_text(f"""\
ClusterName=parallax{os.getpid()}
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
TmpFS={b}/tmp/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MpiDefault=none
ReturnToService=2
MinJobAge=60
KillWait=5
NodeName=pxnode NodeHostname={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=pxnode Default=YES MaxTime=INFINITE State=UP
""")
        self.run("slurmctld", "-f", self.conf)
        self.run("slurmd", "-f", self.conf, "-N", "pxnode")
        for name in ("slurmctld.pid", "slurmd-pxnode.pid"):
            f = b / name
            self.pids.append(int(wait_for(lambda: f.exists() and f.read_text().strip(), 15, name)))

        def idle():
            r = self.run("sinfo", "-h", "-o", "%T", check=False)
            return r.returncode == 0 and r.stdout.split() == ["idle"]

        wait_for(idle, 30, "the Slurm node to be idle")
        return self

    def jobs(self) -> list[str]:
        """Job ids in the queue (pending, running, completing)."""
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def cancel_all(self):
        ids = self.jobs()
        if ids:
            self.run("scancel", *ids, check=False)
            wait_for(lambda: not self.jobs(), 30, "cancelled jobs to leave the queue")

    def stop(self):
        for pid in self.pids:
            stop_pid(pid)
        if self.started_munge:
            f = Path("/run/munge/munged.pid")
            if f.exists():
                stop_pid(int(f.read_text().strip()))


SGE_QUEUE = """\
qname all.q
hostlist localhost
seq_no 0
load_thresholds NONE
suspend_thresholds NONE
nsuspend 1
suspend_interval 00:05:00
priority 0
min_cpu_interval 00:05:00
processors UNDEFINED
qtype BATCH INTERACTIVE
ckpt_list NONE
pe_list NONE
rerun FALSE
slots {slots}
tmpdir /tmp
shell /bin/sh
prolog NONE
epilog NONE
shell_start_mode posix_compliant
starter_method NONE
suspend_method NONE
resume_method NONE
terminate_method NONE
notify 00:00:60
owner_list NONE
user_lists NONE
xuser_lists NONE
subordinate_list NONE
complex_values NONE
projects NONE
xprojects NONE
calendar NONE
initial_state default
""" + "".join(f"{k} INFINITY\n" for k in (
    "s_rt", "h_rt", "s_cpu", "h_cpu", "s_fsize", "h_fsize", "s_data", "h_data", "s_stack", "h_stack",
    "s_core", "h_core", "s_rss", "h_rss", "s_vmem", "h_vmem"))


class GridEngine:
    """Son of Grid Engine from Debian's packages (cell `default` under
    /var/lib/gridengine, made by the package's postinst): sge_qmaster and
    sge_execd on this host, root allowed, 1 s scheduling, one queue."""

    root = Path("/var/lib/gridengine")
    spool = Path("/var/spool/gridengine")

    def __init__(self, base: Path, slots: int = 16):
        self.base = base
        self.slots = slots
        self.env = {**os.environ, "SGE_ROOT": str(self.root), "SGE_CELL": "default"}

    def run(self, *cmd, check=True, timeout=30, input=None) -> subprocess.CompletedProcess:
        r = subprocess.run(list(map(str, cmd)), env=self.env, capture_output=True, text=True, timeout=timeout,
                           input=input)
        if check and r.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def start(self):
        self.base.mkdir(parents=True, exist_ok=True)
        common = self.root / "default" / "common"
        # 127.0.0.1's canonical name is localhost: one host for SGE
        (common / "host_aliases").write_text(f"localhost {socket.gethostname()}\n")
        (common / "act_qmaster").write_text("localhost\n")
        run_dir = Path("/var/run/gridengine")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "sgeadmin", "sgeadmin")
        self.run("/usr/sbin/sge_qmaster")
        wait_for(lambda: self.run("qstat", check=False).returncode == 0, 30, "sge_qmaster")
        # root may run jobs (min_uid/min_gid 1000 by default); the file must be named "global"
        conf = self.run("qconf", "-sconf").stdout
        conf = "\n".join(
            f"{line.split()[0]} 0" if line.split()[:1] in (["min_uid"], ["min_gid"]) else line
            for line in conf.splitlines()
        )
        (self.base / "global").write_text(conf + "\n")
        self.run("qconf", "-Mconf", self.base / "global")
        sconf = self.run("qconf", "-ssconf").stdout.splitlines()
        fast = {"schedule_interval": "0:0:1", "flush_submit_sec": "1", "flush_finish_sec": "1"}
        sconf = [f"{line.split()[0]} {fast[line.split()[0]]}" if line.split()[:1] and line.split()[0] in fast
                 else line for line in sconf]
        (self.base / "sconf").write_text("\n".join(sconf) + "\n")
        self.run("qconf", "-Msconf", self.base / "sconf")
        self.run("qconf", "-as", "localhost", check=False)
        (self.base / "exechost").write_text(
            "hostname localhost\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\n"
            "projects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n")
        if self.run("qconf", "-Ae", self.base / "exechost", check=False).returncode != 0:
            self.run("qconf", "-Me", self.base / "exechost")
        (self.base / "queue").write_text(SGE_QUEUE.format(slots=self.slots))
        if self.run("qconf", "-Aq", self.base / "queue", check=False).returncode != 0:
            self.run("qconf", "-Mq", self.base / "queue")
        # execd after the global config change (it keeps the old min_gid)
        self.run("/usr/sbin/sge_execd")

        def ready():
            out = self.run("qstat", "-f", check=False).stdout
            return any(line.startswith("all.q@localhost") and "lx-amd64" in line and line.split()[-1] == "lx-amd64"
                       for line in out.splitlines())

        wait_for(ready, 60, "the SGE exec host", interval=0.2)
        self.run("qmod", "-c", "all.q", check=False)
        return self

    def jobs(self) -> list[str]:
        out = self.run("qstat", check=False).stdout.splitlines()
        return sorted({line.split()[0] for line in out[2:] if line.strip()})

    def cancel_all(self):
        ids = self.jobs()
        if ids:
            self.run("qdel", *ids, check=False)
            wait_for(lambda: not self.jobs(), 60, "deleted SGE jobs to leave the queue", interval=0.2)

    def stop(self):
        for f in (self.spool / "execd/localhost/execd.pid", self.spool / "qmaster/qmaster.pid"):
            if f.exists():
                stop_pid(int(f.read_text().strip()), timeout=20)


class SshHosts:
    """Hosts for the ssh launcher: network namespaces on a bridge, each
    with its own host name (a UTS namespace) and a key-only sshd, plus an
    sshd on 127.0.0.1 in this namespace. The namespaces share this
    machine's file system (a cluster's shared home) but not its network:
    an engine there reaches a hub only on the bridge address, never on
    127.0.0.1.

    Names and the subnet depend on this process's pid, so two test
    sessions do not collide; `stop` removes everything."""

    def __init__(self, base: Path, n: int = 2):
        self.base = base
        self.n = n
        k = os.getpid() % 200 + 20
        self.tag = f"px{k}"
        self.bridge = f"{self.tag}br"
        self.subnet = f"10.200.{k}"
        self.hub_ip = f"{self.subnet}.1"
        self.names = [f"{self.tag}h{i}" for i in range(1, n + 1)]
        self.addrs = [f"{self.subnet}.{i + 1}" for i in range(1, n + 1)]
        self.hostnames = [f"pxhost{i}" for i in range(1, n + 1)]
        self.config = base / "ssh_config"
        self.loopback_port = free_port()
        self.daemons: list[subprocess.Popen] = []

    def _ip(self, *args, ns: str | None = None, check=True):
        argv = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
        return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)

    def _sshd_config(self, name: str, addr: str, port: int) -> Path:
        b = self.base
        cfg = b / f"sshd_config_{name}"
        cfg.write_text(
            f"Port {port}\nListenAddress {addr}\nHostKey {b / 'host_key'}\nPidFile {b / f'sshd-{name}.pid'}\n"
            f"AuthorizedKeysFile {b / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nMaxStartups 100:30:200\n"
        )
        return cfg

    def start(self) -> "SshHosts":
        b = self.base
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(b / key)], check=True,
                           timeout=30)
        shutil.copy(b / "client_key.pub", b / "authorized_keys")
        os.chmod(b / "authorized_keys", 0o600)
        self.config.write_text(
            f"Host *\n  IdentityFile {b / 'client_key'}\n  IdentitiesOnly yes\n  User root\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
            "  ConnectTimeout 5\n"
        )
        self.stop_network()  # a previous session's leftovers with this pid
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.hub_ip}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for name, addr, hostname in zip(self.names, self.addrs, self.hostnames):
            self._ip("netns", "add", name)
            self._ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
            self._ip("link", "set", f"{name}a", "master", self.bridge)
            self._ip("link", "set", f"{name}a", "up")
            self._ip("link", "set", f"{name}b", "netns", name)
            self._ip("addr", "add", f"{addr}/24", "dev", f"{name}b", ns=name)
            self._ip("link", "set", f"{name}b", "up", ns=name)
            self._ip("link", "set", "lo", "up", ns=name)
            cfg = self._sshd_config(name, addr, 22)
            self.daemons.append(subprocess.Popen(
                ["ip", "netns", "exec", name, "unshare", "--uts", "sh", "-c",
                 f'hostname {hostname} && exec /usr/sbin/sshd -D -f "$0" -E "$1"', str(cfg), str(b / f"sshd-{name}.log")],
                stdin=subprocess.DEVNULL, start_new_session=True))
        cfg = self._sshd_config("lo", "127.0.0.1", self.loopback_port)
        self.daemons.append(subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-f", str(cfg), "-E", str(b / "sshd-lo.log")],
            stdin=subprocess.DEVNULL, start_new_session=True))
        for addr, port in [*((a, 22) for a in self.addrs), ("127.0.0.1", self.loopback_port)]:
            wait_for(lambda: subprocess.run(["ssh", "-F", str(self.config), "-p", str(port), addr, "true"],
                                            capture_output=True, timeout=15).returncode == 0,
                     30, f"sshd on {addr}:{port}", interval=0.2)
        return self

    def ssh_args(self) -> str:
        return f"-F {self.config}"

    def pids_in(self, name: str) -> set[int]:
        """The processes in a namespace host, but its sshd."""
        r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
        daemons = {d.pid for d in self.daemons}
        out = set()
        for p in r.stdout.split():
            pid = int(p)
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if pid not in daemons and exe != "/usr/sbin/sshd" and pid_alive(pid):
                out.add(pid)
        return out

    def stop_network(self):
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)

    def stop(self):
        for d in self.daemons:
            try:
                os.killpg(d.pid, 9)
            except ProcessLookupError:
                pass
            try:
                d.wait(10)
            except subprocess.TimeoutExpired:
                pass
        # what sshd started and a test left behind goes with the hosts
        for name in self.names:
            for pid in self.pids_in(name):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        self.stop_network()
