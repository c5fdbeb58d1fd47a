"""Batch-system daemons and hosts for the launcher tests, started by hand
in a temp dir (there is no systemd here): munged + slurmctld + slurmd
(on this host, or each slurmd in a network namespace host), Grid Engine,
sshd in network namespace hosts.

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
    127.0.0.1 with ports of their own, all state under `base`. Subclasses
    place the daemons elsewhere (`ctld_host`, `node_lines`,
    `start_slurmds`)."""

    def __init__(self, base: Path, cpus: int = 32):
        self.base = base
        self.cpus = cpus
        self.conf = base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started_munge = False
        self.nodes = ["pxnode"]
        #: slurmctld's, then each slurmd's
        self.pids: list[int] = []

    def run(self, *cmd, check=True, timeout=30) -> subprocess.CompletedProcess:
        r = subprocess.run(list(map(str, cmd)), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def ctld_host(self) -> str:
        return "localhost"

    def node_lines(self) -> str:
        return (f"NodeName=pxnode NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                "State=UNKNOWN\n")

    def start_slurmds(self):
        self.run("slurmd", "-f", self.conf, "-N", "pxnode")

    def start(self):
        b = self.base
        for d in ("state", "log", *(f"{top}/{node}" for node in self.nodes for top in ("spool", "tmp"))):
            (b / d).mkdir(parents=True, exist_ok=True)
        if not munge_works():
            run_dir = Path("/run/munge")
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.chown(run_dir, "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
            self.started_munge = True
            wait_for(munge_works, 10, "munged")
        self.conf.write_text(f"""\
ClusterName=px{type(self).__name__.lower()}{os.getpid()}
SlurmctldHost={self.ctld_host()}
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
{self.node_lines()}PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

        def pid_file(name: str) -> int:
            f = b / f"{name}.pid"
            return int(wait_for(lambda: f.exists() and f.read_text().strip(), 15, f.name))

        self.run("slurmctld", "-f", self.conf)
        self.pids.append(pid_file("slurmctld"))
        self.start_slurmds()
        self.pids += [pid_file(f"slurmd-{node}") for node in self.nodes]

        def idle():
            r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            return r.returncode == 0 and r.stdout.split() == ["idle"] * len(self.nodes)

        wait_for(idle, 30, "the Slurm nodes to be idle")
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
        # also daemons whose pid file came after a failed start gave up
        files = [self.base / "slurmctld.pid", *(self.base / f"slurmd-{node}.pid" for node in self.nodes)]
        for f in files:
            try:
                pid = int(f.read_text().strip())
            except (OSError, ValueError):
                continue
            if pid not in self.pids:
                self.pids.append(pid)
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


class NetnsHosts:
    """Hosts that are network namespaces on a bridge: each has its own
    network stack (reachable from here, and from each other, only on the
    bridge's subnet; its 127.0.0.1 is its own) and, for what `in_host`
    starts there, its own host name (a UTS namespace). They share this
    machine's file system, as a cluster's nodes share home directories.

    Names and the subnet depend on this process's pid (modulo 200) and on
    `prefix` / `octet` (one pair per kind of fixture), so two test
    sessions, or two fixtures of one session, do not collide;
    `stop_network` removes them."""

    def __init__(self, n: int, prefix: str, octet: int, hostname: str):
        self.n = n
        k = os.getpid() % 200 + 20
        self.tag = f"{prefix}{k}"  # interface names: at most 15 bytes
        self.bridge = f"{self.tag}br"
        self.subnet = f"10.{octet}.{k}"
        self.hub_ip = f"{self.subnet}.1"
        self.names = [f"{self.tag}h{i}" for i in range(1, n + 1)]
        self.addrs = [f"{self.subnet}.{i + 1}" for i in range(1, n + 1)]
        self.hostnames = [f"{hostname}{i}" for i in range(1, n + 1)]

    def _ip(self, *args, ns: str | None = None, check=True):
        argv = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
        return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)

    def start_network(self):
        self.stop_network()  # a previous session's leftovers with this pid
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.hub_ip}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for name, addr in zip(self.names, self.addrs):
            self._ip("netns", "add", name)
            self._ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
            self._ip("link", "set", f"{name}a", "master", self.bridge)
            self._ip("link", "set", f"{name}a", "up")
            self._ip("link", "set", f"{name}b", "netns", name)
            self._ip("addr", "add", f"{addr}/24", "dev", f"{name}b", ns=name)
            self._ip("link", "set", f"{name}b", "up", ns=name)
            self._ip("link", "set", "lo", "up", ns=name)

    def in_host(self, i: int, argv: list) -> list[str]:
        """`argv` as run on host i: in its network namespace, under its
        host name. nsenter, not `ip netns exec`: that remounts /sys, and
        slurmd then dies ("No filesystem mounted on /sys/fs/cgroup")."""
        return ["nsenter", f"--net=/run/netns/{self.names[i]}", "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostnames[i], *map(str, argv)]

    def all_pids_in(self, name: str) -> set[int]:
        r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
        return {int(p) for p in r.stdout.split() if pid_alive(int(p))}

    def kill_all_in(self, name: str):
        for pid in self.all_pids_in(name):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def stop_network(self):
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)


class SshHosts(NetnsHosts):
    """Hosts for the ssh launcher: network namespace hosts (`NetnsHosts`)
    with a key-only sshd each, plus an sshd on 127.0.0.1 in this
    namespace. An engine there reaches a hub only on the bridge address,
    never on 127.0.0.1."""

    def __init__(self, base: Path, n: int = 2):
        super().__init__(n, prefix="px", octet=200, hostname="pxhost")
        self.base = base
        self.config = base / "ssh_config"
        self.loopback_port = free_port()
        self.daemons: list[subprocess.Popen] = []

    def _sshd_config(self, name: str, addr: str, port: int) -> Path:
        b = self.base
        cfg = b / f"sshd_config_{name}"
        cfg.write_text(
            f"Port {port}\nListenAddress {addr}\nHostKey {b / 'host_key'}\nPidFile {b / f'sshd-{name}.pid'}\n"
            f"AuthorizedKeysFile {b / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nMaxStartups 100:30:200\n"
            # a Slurm "login node" behind a proxy: the test passes its slurm.conf
            "AcceptEnv SLURM_CONF\n"
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
        self.start_network()
        for name, addr, hostname in zip(self.names, self.addrs, self.hostnames):
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
        daemons = {d.pid for d in self.daemons}
        out = set()
        for pid in self.all_pids_in(name):
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if pid not in daemons and exe != "/usr/sbin/sshd":
                out.add(pid)
        return out

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
            self.kill_all_in(name)
        self.stop_network()


class SlurmNetns(Slurm):
    """Slurm across hosts: slurmctld here, reached on the bridge address of
    `n` network namespace hosts (`NetnsHosts`), and one slurmd on each
    (node name = host name; `cpus` CPUs per node, 2 by default, so that 4
    tasks need both nodes). A job's tasks run on those hosts: its engines
    reach a hub only on the bridge address."""

    def __init__(self, base: Path, n: int = 2, cpus: int = 2):
        super().__init__(base, cpus)
        self.hosts = NetnsHosts(n, prefix="ps", octet=201, hostname="pxslurm")
        self.nodes = list(self.hosts.hostnames)

    def ctld_host(self) -> str:
        return f"{socket.gethostname()}({self.hosts.hub_ip})"

    def node_lines(self) -> str:
        return "".join(f"NodeName={node} NodeAddr={addr} CPUs={self.cpus} State=UNKNOWN\n"
                       for node, addr in zip(self.nodes, self.hosts.addrs))

    def start(self):
        self.hosts.start_network()
        return super().start()

    def start_slurmds(self):
        # slurmd daemonizes: each command returns once its slurmd runs
        for i, node in enumerate(self.nodes):
            self.run(*self.hosts.in_host(i, ["slurmd", "-f", self.conf, "-N", node]))

    def pids_in(self, i: int) -> set[int]:
        """The processes on host i but its slurmd: job steps, engines."""
        return self.hosts.all_pids_in(self.hosts.names[i]) - set(self.pids[1:])

    def stop(self):
        super().stop()
        for name in self.hosts.names:
            self.hosts.kill_all_in(name)
        self.hosts.stop_network()
