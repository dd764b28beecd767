"""A throwaway multi-node Ray cluster on loopback, for tests and benchmarks.

Each cluster lives in its own network namespace holding only `lo`: Ray binds the machine's interface address
even when told 127.0.0.1, and inside the namespace there is none, so nothing leaves the machine. Every node
is a `ray start --block` process with its own temp dir and ports, stopped by the PID that started it
(SIGTERM tears its node down); `ray stop` is never used, since it would kill every Ray process on the machine.
Needs root (`ip netns`) and the `ray` extra.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
HEAD_PORT = 6379


def ray_missing_reason() -> str | None:
    """Why a cluster cannot be made here, or None."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'tinysam-kit[ray]')"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not available"
    name = f"tsk{uuid.uuid4().hex[:8]}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network namespaces are not permitted here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class LoopbackCluster:
    """`with LoopbackCluster(workers=[1]) as c:` — a head node and worker nodes (logical CPUs each) in a
    fresh namespace; `c.run([...])` runs a command there (the driver); `c.address` is the head's address.
    `cpu_sets` pins each worker node to host CPUs (taskset) so a "1-CPU node" really has one core."""

    def __init__(self, workers: list[int] = (1,), head_cpus: int = 1, cpu_sets: list[str] | None = None,
                 env: dict | None = None) -> None:
        self.worker_cpus = list(workers)
        self.head_cpus = head_cpus
        self.cpu_sets = cpu_sets
        self.netns = f"tsk{uuid.uuid4().hex[:8]}"
        self.root = Path(tempfile.mkdtemp(prefix="tskray"))
        self.address = f"127.0.0.1:{HEAD_PORT}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.nodes: list[subprocess.Popen] = []
        self.relays: list[subprocess.Popen] = []
        self.logs = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LoopbackCluster:
        try:
            self._ip("netns", "add", self.netns)
            self._ip("netns", "exec", self.netns, "ip", "link", "set", "lo", "up")
            self._start_node(0, head=True, cpus=self.head_cpus)
            self._wait_for_raylet(0)
            for i, cpus in enumerate(self.worker_cpus, start=1):
                self._start_node(i, head=False, cpus=cpus)
            for i in range(1, len(self.nodes)):
                self._wait_for_raylet(i)
            self.wait_for_nodes(len(self.nodes))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for relay in self.relays:
            if relay.poll() is None:
                relay.kill()
                relay.wait()
        for proc in reversed(self.nodes):  # workers first, then the head; all wind down together
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in reversed(self.nodes):
            self.stop_node(proc)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _ip(self, *args) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def netns_prefix(self, cpu_set: str | None = None) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns]
        return prefix + (["taskset", "-c", cpu_set] if cpu_set else [])

    def _start_node(self, index: int, *, head: bool, cpus: int) -> None:
        base = 20000 + index * 1000  # each node its own port range: all nodes share one loopback address
        temp = self.root / f"n{index}"
        temp.mkdir()
        args = [str(VENV_BIN / "ray"), "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0",
                f"--temp-dir={temp}", f"--node-manager-port={base + 1}", f"--object-manager-port={base + 2}",
                f"--dashboard-agent-grpc-port={base + 3}", f"--dashboard-agent-listen-port={base + 4}",
                f"--metrics-export-port={base + 5}", f"--runtime-env-agent-port={base + 6}",
                f"--min-worker-port={base + 100}", f"--max-worker-port={base + 999}", "--disable-usage-stats",
                "--object-store-memory=200000000"]
        if head:
            args += ["--head", f"--port={HEAD_PORT}", "--include-dashboard=false"]
        else:
            args += [f"--address={self.address}"]
        cpu_set = self.cpu_sets[index - 1] if (self.cpu_sets and not head) else None
        log = open(self.root / f"node{index}.log", "wb")  # noqa: SIM115 - closed in __exit__
        self.logs.append(log)
        self.nodes.append(subprocess.Popen(self.netns_prefix(cpu_set) + args, stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))

    def stop_node(self, proc: subprocess.Popen, timeout: float = 10) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the node's own process group, started above
                proc.wait()

    # ------------------------------------------------------------------ use
    def run(self, args: list[str], timeout: float = 600, cpu_set: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the namespace (e.g. a driver connecting to `self.address`)."""
        return subprocess.run(self.netns_prefix(cpu_set) + list(args), capture_output=True, text=True,
                              timeout=timeout, env={**self.env, **(env or {})})

    def forward_port(self, port: int) -> None:
        """Make 127.0.0.1:`port` of the host (e.g. a database or a Label Studio server) reachable at the same
        address inside the namespace, through a Unix socket and two relays stopped with the cluster."""
        relay = str(Path(__file__).with_name("port_relay.py"))
        sock = str(self.root / f"relay-{port}.sock")
        for cmd in ([sys.executable, relay, "unix-to-tcp", sock, str(port)],
                    self.netns_prefix() + [sys.executable, relay, "tcp-to-unix", str(port), sock]):
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.relays.append(proc)
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"port relay {cmd} did not start")

    def alive_nodes(self) -> int:
        code = (f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        out = self.run([sys.executable, "-c", code], timeout=60)
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def wait_for_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.nodes):
                raise RuntimeError(f"a Ray node exited while starting:\n{self.node_log()}")
            if self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"{n} Ray node(s) did not come up in {timeout:.0f} s:\n{self.node_log()}")

    def _wait_for_raylet(self, index: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nodes[index].poll() is not None:
                raise RuntimeError(f"Ray node {index} exited while starting:\n{self.node_log()}")
            if list((self.root / f"n{index}").glob("session_*/sockets/raylet")):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Ray node {index} did not start in {timeout:.0f} s:\n{self.node_log()}")

    def node_log(self) -> str:
        return "\n".join((self.root / f"node{i}.log").read_text(errors="replace")[-2000:]
                         for i in range(len(self.nodes)) if (self.root / f"node{i}.log").exists())

    def raylet_pids(self, index: int) -> list[int]:
        """PIDs of node `index`'s raylet (found by its temp dir on the command line)."""
        marker = str(self.root / f"n{index}")
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"raylet") and any(marker.encode() in part for part in cmd):
                pids.append(int(entry.name))
        return pids
