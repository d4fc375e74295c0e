"""A real node beside the harness's kwok nodes: containerd + runc + kubelet, with Service routing
(kube-proxy) and name resolution (CoreDNS) confined to a bridge the tests create.

Everything runs as local processes from `tests/cluster/build-binaries.sh` (kubelet, kube-proxy,
CoreDNS, a static pause binary) and Debian's packages (containerd, runc, the CNI plugins). Pods get
addresses on the bridge `BRIDGE` (`NODE_SUBNET`), whose own address is the node IP; the CNI
configuration gives them a route to the bridge's subnet and the Service range only: no default route,
no masquerade to the outside, so no pod traffic leaves the machine. CoreDNS listens on the bridge
address (the kubelet's clusterDNS) and answers only for cluster.local; kube-proxy (iptables mode)
routes the Service range. Images come from a local docker-archive (images/build.sh) imported with
`ctr images import`, as `kind load image-archive` does; pods use `imagePullPolicy: Never`.

The node changes the host, and `Node.stop()` restores it: the sysctls the kubelet and kube-proxy
set, the bridge, kube-proxy's iptables chains (`kube-proxy --cleanup`) and any other KUBE-* chain
that was not there before, the mounts under the node's folders, the containers (by ctr) and every
process it started, by PID. Needs root. See docs/cluster-harness.md ("A real node").
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from k8s_harness import (  # noqa: F401 - wait_for is for the tests
    SERVICE_CLUSTER_IP_RANGE,
    Cluster,
    free_port,
    stop_process,
    tail,
    wait_for,
    write_kubeconfig,
)

NODE_NAME = "wrpo-node-0"
BRIDGE = "wrpo-br0"
NODE_SUBNET = "10.247.0.0/24"
NODE_IP = "10.247.0.1"
CLUSTER_DOMAIN = "cluster.local"
PAUSE_IMAGE = "localhost/wrpo-pause:1"
#: Label of the real node (the kwok nodes have type=kwok).
NODE_LABEL = ("wrpo.test/real-node", "true")
#: Host sysctls the kubelet or kube-proxy may change; restored on stop.
SYSCTLS = (
    "vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops", "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet", "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_max", "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns", "pause")
HOST_PROGRAMS = ("containerd", "ctr", "runc", "ip", "iptables", "iptables-save", "mount", "umount")
CNI_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")


class NodeUnavailable(RuntimeError):
    """What the node needs is missing (root, Debian packages, node binaries)."""


def missing_prerequisites(bin_dir: Path) -> list[str]:
    """What this machine lacks to run the node; empty when it can."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    missing += [p for p in HOST_PROGRAMS if shutil.which(p) is None]
    missing += [f"{CNI_DIR}/{p}" for p in CNI_PLUGINS if not (CNI_DIR / p).is_file()]
    missing += [f"{bin_dir}/{b}" for b in NODE_BINARIES if not (bin_dir / b).exists()]
    return missing


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


def _run(*argv: object, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _kube_chains() -> set[tuple[str, str, str]]:
    """(command, table, chain) of every KUBE-* chain in iptables and ip6tables."""
    out = set()
    for cmd in ("iptables", "ip6tables"):
        if shutil.which(f"{cmd}-save") is None:
            continue
        table = ""
        for line in _run(f"{cmd}-save", check=False).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":KUBE-"):
                out.add((cmd, table, line[1:].split()[0]))
    return out


def _cgroup_parents() -> list[Path]:
    """The cgroup folders containerd's CRI puts containers under (cgroup v1: one per controller)."""
    return [p for p in Path("/sys/fs/cgroup").glob("*/k8s.io") if p.is_dir()] + \
        [p for p in [Path("/sys/fs/cgroup/k8s.io")] if p.is_dir()]


def pause_archive(pause_binary: Path, out: Path, name: str = PAUSE_IMAGE) -> Path:
    """A one-file docker-archive image (the sandbox image) holding the static pause binary."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("pause")
        data = pause_binary.read_bytes()
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "tests/cluster/k8s_node.py pause_archive"}],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [name], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(out, "w") as tar:
        for member, payload in (("layer.tar", layer_bytes), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(member)
            info.size, info.mtime = len(payload), 0
            tar.addfile(info, io.BytesIO(payload))
    return out


@dataclass
class Node:
    """A running real node. `stop()` stops it and restores the host."""

    cluster: Cluster
    work_dir: Path
    state_dir: Path  # containerd's root: images persist here between runs
    name: str = NODE_NAME
    ip: str = NODE_IP
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    restore_sysctls: dict[str, str] = field(default_factory=dict)
    chains_before: set = field(default_factory=set)
    cgroups_before: set = field(default_factory=set)
    timings: dict[str, float] = field(default_factory=dict)
    bridge_created: bool = False

    @property
    def socket(self) -> Path:
        return self.work_dir / "containerd" / "containerd.sock"

    @property
    def bin_dir(self) -> Path:
        return self.cluster.bin_dir

    def ctr(self, *args: object, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ctr", "--address", self.socket, "--namespace", "k8s.io", *args, timeout=timeout, check=check)

    # -- processes --------------------------------------------------------------------------------

    def _start(self, name: str, argv: list[object], env: dict[str, str] | None = None) -> subprocess.Popen:
        log_dir = self.work_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = self.logs[name] = log_dir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=self.work_dir, start_new_session=True)
        self.processes[name] = process
        with (self.work_dir / "pids").open("a") as pids:
            pids.write(f"{process.pid} {name}\n")
        return process

    def _wait(self, name: str, what: str, check, timeout: float = 120) -> None:
        process = self.processes[name]

        def alive_and_ready():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail(self.logs[name])}")
            return check()

        try:
            wait_for(what, alive_and_ready, timeout)
        except (TimeoutError, RuntimeError) as e:
            raise RuntimeError(f"{e}\n--- {self.logs[name]} ---\n{tail(self.logs[name])}") from None

    def log_tails(self, lines: int = 20) -> str:
        return "\n".join(f"--- {n} ({p}) ---\n{tail(p, lines)}" for n, p in self.logs.items())

    # -- start ------------------------------------------------------------------------------------

    def start(self, images: list[Path], timeout: float = 180) -> Node:
        t0 = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.chains_before = _kube_chains()
        self.cgroups_before = set(_cgroup_parents())
        for name in SYSCTLS:
            with contextlib.suppress(OSError):
                self.restore_sysctls[name] = _sysctl_path(name).read_text().strip()
        self._bridge()
        self._containerd()
        self._remove_containers()  # those of a run that was killed before its teardown
        self._import(images)
        self.timings["images_s"] = round(time.monotonic() - t0, 1)
        self._coredns()
        self._kubelet(timeout)
        self._kube_proxy()
        self.timings["ready_s"] = round(time.monotonic() - t0, 1)
        return self

    def _bridge(self) -> None:
        """The test-owned bridge, with the node IP; forwarding on so that Service traffic (DNAT'ed by
        kube-proxy) gets from one pod to another through the host."""
        if Path(f"/sys/class/net/{BRIDGE}").exists():  # left over by a killed run
            _run("ip", "link", "del", BRIDGE)
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self.bridge_created = True
        _run("ip", "addr", "add", f"{self.ip}/{NODE_SUBNET.split('/')[1]}", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        _sysctl_path("net/ipv4/ip_forward").write_text("1")
        cni = self.work_dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0", "name": "wrpo-node",
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": True, "isDefaultGateway": False,
                "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(cni / "ipam"),
                         "ranges": [[{"subnet": NODE_SUBNET, "gateway": self.ip}]],
                         "routes": [{"dst": SERVICE_CLUSTER_IP_RANGE}]},
            }],
        }
        (cni / "net.d" / "10-wrpo.conflist").write_text(json.dumps(conflist, indent=1))

    def _containerd(self) -> None:
        d = self.work_dir / "containerd"
        d.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{self.state_dir}"
state = "{d / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{d / 'ttrpc.sock'}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_hugetlb_controller = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_DIR}"
    conf_dir = "{self.work_dir / 'cni' / 'net.d'}"
"""
        (d / "config.toml").write_text(config)
        self._start("containerd", ["containerd", "--config", d / "config.toml"])
        self._wait("containerd", "containerd socket", lambda: self.ctr("version", timeout=10).returncode == 0, 60)

    def _import(self, archives: list[Path]) -> None:
        """Import the pause image and the given docker-archives, unless an archive with the same
        content digest (archive_digest) was imported into this containerd root before and its images
        are all still there: a rebuilt but unchanged archive is not imported again."""
        archives = [pause_archive(self.bin_dir / "pause", self.work_dir / "pause.tar"), *archives]
        stamps = self.state_dir / "imported.json"
        done = json.loads(stamps.read_text()) if stamps.exists() else {}
        present = self.images()
        for archive in archives:
            key = archive_digest(archive)
            if done.get(str(archive)) == key and archive_tags(archive) <= present:
                self.timings[f"import {archive.name} s"] = 0.0
                continue
            t0 = time.monotonic()
            self.ctr("images", "import", "--snapshotter", "overlayfs", archive, timeout=1800)
            self.timings[f"import {archive.name} s"] = round(time.monotonic() - t0, 1)
            done[str(archive)] = key
            stamps.write_text(json.dumps(done, indent=1))

    def images(self) -> set[str]:
        return {line.split()[0] for line in self.ctr("images", "ls", "-q").stdout.splitlines() if line.strip()}

    def _coredns(self) -> None:
        """CoreDNS on the bridge address: cluster.local from the apiserver, nothing else."""
        health, ready = free_port(), free_port()
        corefile = self.work_dir / "Corefile"
        corefile.write_text(f""".:53 {{
    bind {self.ip}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.cluster.kubeconfig} wrpo-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")
        self._start("coredns", [self.bin_dir / "coredns", "-conf", corefile])
        self._wait("coredns", "CoreDNS /ready", lambda: _get(f"http://127.0.0.1:{ready}/ready"), 60)

    def _kubelet(self, timeout: float) -> None:
        ca = self.cluster.ca
        assert ca is not None, "the cluster has no CA"
        d = self.work_dir / "kubelet"
        d.mkdir(parents=True, exist_ok=True)
        client = ca.issue(f"kubelet-{self.name}", f"/O=system:nodes/CN=system:node:{self.name}", client=True)
        serving = ca.issue(f"kubelet-serving-{self.name}", f"/CN={self.name}",
                           server_names=(self.ip, self.name))
        kubeconfig = write_kubeconfig(d / "kubelet.kubeconfig", self.cluster.server, ca.cert,
                                      cert=client[0], key=client[1], user=f"system:node:{self.name}")
        resolv = d / "resolv.conf"  # the pods' upstream for dnsPolicy Default: nothing
        resolv.write_text("")
        port, healthz = free_port(), free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.ip, "port": port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": healthz,
            "authentication": {"x509": {"clientCAFile": str(ca.cert)}, "anonymous": {"enabled": False},
                               "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},  # only the apiserver holds a cert of our CA
            "tlsCertFile": str(serving[0]), "tlsPrivateKeyFile": str(serving[1]),
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [], "failSwapOn": False, "makeIPTablesUtilChains": False,
            "protectKernelDefaults": False, "maxOpenFiles": 20000,
            "volumePluginDir": str(d / "volume-plugins"), "podLogsDir": str(d / "pod-logs"),
            "staticPodPath": "", "resolvConf": str(resolv),
            "clusterDNS": [self.ip], "clusterDomain": CLUSTER_DOMAIN,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "registerNode": True, "kubeAPIQPS": 50, "kubeAPIBurst": 100,
            "nodeStatusReportFrequency": "10s", "syncFrequency": "10s",
            "runtimeRequestTimeout": "10m", "shutdownGracePeriod": "0s",
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        key, value = NODE_LABEL
        self._start("kubelet", [
            self.bin_dir / "kubelet", f"--config={d / 'config.yaml'}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={d / 'root'}", f"--cert-dir={d / 'pki'}", f"--hostname-override={self.name}",
            f"--node-ip={self.ip}", f"--node-labels={key}={value}", "--v=1",
        ])
        from kubernetes import client as k8s

        with contextlib.closing(self.cluster.api_client()) as api:
            core = k8s.CoreV1Api(api)

            def ready():
                node = core.read_node(self.name)
                conditions = {c.type: c.status for c in node.status.conditions or []}
                tainted = any(t.key == "node.kubernetes.io/not-ready" for t in node.spec.taints or [])
                return conditions.get("Ready") == "True" and not tainted

            self._wait("kubelet", f"node {self.name} Ready", ready, timeout)

    def _kube_proxy(self) -> None:
        """kube-proxy in iptables mode for the apiserver's Service range (SERVICE_CLUSTER_IP_RANGE)."""
        healthz, metrics = free_port(), free_port()
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.cluster.kubeconfig)},
            "mode": "iptables", "hostnameOverride": self.name, "bindAddress": self.ip,
            "healthzBindAddress": f"127.0.0.1:{healthz}", "metricsBindAddress": f"127.0.0.1:{metrics}",
            "clusterCIDR": NODE_SUBNET, "detectLocalMode": "ClusterCIDR",
            "nodePortAddresses": [f"{self.ip}/32"],  # NodePorts on the bridge only
            # Replies come back through the host; no localhost NodePorts (no route_localnet sysctl);
            # conntrack sysctls left alone (maxPerCore 0).
            "iptables": {"masqueradeAll": True, "localhostNodePorts": False, "syncPeriod": "10s",
                         "minSyncPeriod": "0s"},
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        path = self.work_dir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        self._start("kube-proxy", [self.bin_dir / "kube-proxy", f"--config={path}", "--v=1"])
        self._wait("kube-proxy", "kube-proxy /healthz",
                   lambda: _get(f"http://127.0.0.1:{healthz}/healthz"), 60)

    # -- stop -------------------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop everything and restore the host; returns what could not be restored (also logged)."""
        problems: list[str] = []

        def attempt(what: str, fn, *args) -> None:
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - go on restoring the rest, report at the end
                problems.append(f"{what}: {e}")

        for name in ("kube-proxy", "kubelet", "coredns"):
            if name in self.processes:
                attempt(f"stop {name}", stop_process, self.processes[name])
        if "kube-proxy" in self.processes:
            attempt("kube-proxy --cleanup", _run, self.bin_dir / "kube-proxy", "--cleanup", "--v=0")
        if "containerd" in self.processes and self.processes["containerd"].poll() is None:
            attempt("remove containers", self._remove_containers)
        shims = self._shim_pids()
        if "containerd" in self.processes:
            attempt("stop containerd", stop_process, self.processes["containerd"])
        for pid in shims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        attempt("unmount", self._unmount)
        attempt("iptables", self._remove_new_chains)
        attempt("cgroups", self._remove_new_cgroups)
        for name, value in self.restore_sysctls.items():
            path = _sysctl_path(name)
            with contextlib.suppress(OSError):
                if path.read_text().strip() != value:
                    attempt(f"sysctl {name}", path.write_text, value)
        if self.bridge_created and Path(f"/sys/class/net/{BRIDGE}").exists():
            attempt("delete bridge", _run, "ip", "link", "del", BRIDGE)
        self.processes.clear()
        if problems:
            print("node teardown problems:\n  " + "\n  ".join(problems))
        return problems

    def _remove_containers(self) -> None:
        for line in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", line, check=False, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            for line in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "delete", "--force", line, check=False, timeout=30)
            time.sleep(0.5)
        for line in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", line, check=False, timeout=60)

    def _shim_pids(self) -> list[int]:
        """containerd-shim processes serving this containerd (found by its socket in their argv)."""
        pids = []
        needle = str(self.socket).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    argv = (entry / "cmdline").read_bytes()
                    if b"containerd-shim" in argv and needle in argv:
                        pids.append(int(entry.name))
        return pids

    def _unmount(self) -> None:
        roots = (str(self.work_dir), str(self.state_dir))
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(roots):
                mounts.append(point)
        for point in sorted(set(mounts), key=len, reverse=True):
            _run("umount", "-l", point, check=False)
        left = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                if ln.split()[4].startswith(roots)]
        if left:
            raise RuntimeError(f"still mounted: {left}")

    def _remove_new_cgroups(self) -> None:
        """The `k8s.io` cgroup parents the containers were put under (each controller), once empty."""
        for parent in set(_cgroup_parents()) - self.cgroups_before:
            for d in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                d.rmdir()
            parent.rmdir()

    def _remove_new_chains(self) -> None:
        new = _kube_chains() - self.chains_before
        for cmd, table, chain in sorted(new):  # flush all first: chains may jump to each other
            _run(cmd, "-t", table, "-F", chain, check=False)
        for cmd, table, chain in sorted(new):
            rules = _run(f"{cmd}-save", "-t", table, check=False).stdout.splitlines()
            for rule in rules:  # jumps into the chain from built-in chains
                if rule.startswith("-A ") and f"-j {chain}" in rule:
                    _run(cmd, "-t", table, "-D", *shlex.split(rule[3:]), check=False)
            _run(cmd, "-t", table, "-X", chain, check=False)
        still = _kube_chains() - self.chains_before
        if still:
            raise RuntimeError(f"iptables chains left: {sorted(still)}")


def image_names(root: Path) -> dict[str, str]:
    """target -> image name, as images/build.sh names them (`--list`)."""
    out = _run("bash", root / "images" / "build.sh", "--list").stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def image_archive(root: Path) -> Path:
    """The docker-archive of images/build.sh: $WRPO_IMAGE_ARCHIVE, else the default path it writes."""
    if os.environ.get("WRPO_IMAGE_ARCHIVE"):
        return Path(os.environ["WRPO_IMAGE_ARCHIVE"])
    cache = Path(os.environ.get("WRPO_CACHE", Path.home() / ".cache" / "wrpo"))
    image_cache = Path(os.environ.get("WRPO_IMAGE_CACHE", cache / "images"))
    version = image_names(root)["operator"].rsplit(":", 1)[1]
    return image_cache / f"wrpo-images-{version}.tar"


def archive_tags(archive: Path) -> set[str]:
    """The image names a docker-archive holds (its manifest.json)."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        return {tag for entry in json.load(member) for tag in entry.get("RepoTags") or []}


def archive_digest(archive: Path) -> str:
    """The sha256 of a docker-archive's manifest.json: it names every image (tag) and its config by
    digest (the config names every layer by digest), so equal digests mean the same images, whatever
    the file's mtime. Read without reading the layers."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None, f"{archive}: no manifest.json (not a docker-archive)"
        return "sha256:" + hashlib.sha256(member.read()).hexdigest()


def _get(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def start_node(cluster: Cluster, work_dir: Path, state_dir: Path, images: list[Path],
               timeout: float = 180) -> Node:
    """Start the node; on any failure stop what was started (restoring the host) and re-raise."""
    missing = missing_prerequisites(cluster.bin_dir)
    if missing:
        raise NodeUnavailable(f"the real node needs: {', '.join(missing)}")
    node = Node(cluster, work_dir, state_dir)
    try:
        return node.start(images, timeout)
    except BaseException:
        node.stop()
        raise
