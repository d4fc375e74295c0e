"""A real Kubernetes control plane on one machine, for tests.

etcd, kube-apiserver (RBAC + Node authorization, client-certificate admin), kube-controller-manager,
kube-scheduler, kwok (fake Nodes and pod lifecycles from ``kwok/stages.yaml``) and the Kubeflow
training-operator (PyTorchJob controller and validating webhook) run as local processes, every
listener on 127.0.0.1 with a free port. Binaries come from ``tests/cluster/build-binaries.sh``
(``WRPO_K8S_BIN``). Each process logs to a file under the cluster's work directory and is stopped
by PID. Only when asked, ``start_controllers`` adds JobSet, Kubeflow Trainer v2 and Kueue (built by
``tests/cluster/build-controllers.sh``, ``WRPO_CONTROLLERS_BIN``). See docs/cluster-harness.md.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from wrpo.data.serving import free_port  # one allocator for every listener (docs/cluster-harness.md, "Ports")

HERE = Path(__file__).resolve().parent
STAGES_FILE = HERE / "kwok" / "stages.yaml"

#: Pod annotation (or label) that makes the kwok pod-fail Stage end a running pod as Failed.
FAIL_ANNOTATION = "wrpo.test/fail"
#: Pod annotation with the exit code the fail hook reports (default "1").
EXIT_CODE_ANNOTATION = "wrpo.test/exit-code"
#: Pod annotation: how long a Job/PyTorchJob pod stays Running under kwok (Go duration, "5s").
RUN_DURATION_ANNOTATION = "wrpo.test/run-duration"
#: Pods with this label set to "true", or in a namespace named LOCAL_NAMESPACE_PREFIX*, are left
#: to the PodRunner instead of kwok.
LOCAL_LABEL = "wrpo.test/local"
LOCAL_NAMESPACE_PREFIX = "local-"
#: Annotation and label value that put a Node under kwok's management.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

REQUIRED_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "helm",
    "training-operator-local",
)
#: Optional binaries: tests that need one skip without it (or fail with WRPO_REQUIRE_CLUSTER=1).
OPTIONAL_BINARIES = ("kubectl",)
#: Namespace labels of the Pod Security admission enforcing the `restricted` standard.
RESTRICTED_LABELS = {"pod-security.kubernetes.io/enforce": "restricted",
                     "pod-security.kubernetes.io/enforce-version": "latest",
                     "pod-security.kubernetes.io/warn": "restricted"}
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
PYTORCHJOB_WEBHOOK_PATH = "/validate-kubeflow-org-v1-pytorchjob"


class BinariesMissing(RuntimeError):
    """The control-plane binaries are not built (run tests/cluster/build-binaries.sh)."""


def bin_cache() -> Path:
    """Where build-binaries.sh and build-controllers.sh put their builds: $WRPO_BIN_CACHE, else
    ${WRPO_CACHE:-~/.cache/wrpo}/k8s-bin (the scripts' own default)."""
    cache = Path(os.environ.get("WRPO_CACHE") or Path.home() / ".cache" / "wrpo")
    return Path(os.environ.get("WRPO_BIN_CACHE") or cache / "k8s-bin")


def find_binaries() -> Path:
    """The directory holding the built binaries: $WRPO_K8S_BIN, else the cache's `current` link."""
    configured = os.environ.get("WRPO_K8S_BIN")
    cache = bin_cache()
    bin_dir = Path(configured) if configured else cache / "current"
    missing = [b for b in REQUIRED_BINARIES if not (bin_dir / b).is_file()]
    if not (bin_dir / "training-operator-crds").is_dir():
        missing.append("training-operator-crds/")
    if missing:
        source = "WRPO_K8S_BIN" if configured else f"{cache}/current (WRPO_K8S_BIN unset)"
        raise BinariesMissing(
            f"control-plane binaries missing in {bin_dir} [{source}]: {', '.join(missing)}; "
            "build them with tests/cluster/build-binaries.sh and export WRPO_K8S_BIN=<dir>"
        )
    return bin_dir


def wait_for(what: str, check: Callable[[], object], timeout: float, interval: float = 0.2,
             seen: Callable[[], str] | None = None):
    """Poll `check` until it returns a truthy value. A timeout is a hang detector: the TimeoutError names
    `what`, the last value `check` returned, its last error and what `seen()` describes then (when given)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    result: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last_error = e
        time.sleep(interval)
    saw = f"; then: {seen()}" if seen else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last value: {result!r}, last error: "
                       f"{last_error}){saw}")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


# --------------------------------------------------------------------------------------------
# Certificates (openssl CLI, so the harness needs no extra Python package)


class CertAuthority:
    """A throwaway CA that signs serving and client certificates with openssl."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert = self.dir / "ca.crt"
        self.key = self.dir / "ca.key"
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", self.key)
        _openssl(
            "req", "-x509", "-new", "-key", self.key, "-sha256", "-days", "3",
            "-subj", "/CN=wrpo-test-ca", "-out", self.cert,
        )

    def issue(self, name: str, subject: str, *, server_names: tuple[str, ...] = (),
              client: bool = False) -> tuple[Path, Path]:
        """Sign a certificate; returns (cert, key). `server_names` are DNS names or IPs."""
        key, csr, crt = (self.dir / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
        _openssl("req", "-new", "-key", key, "-subj", subject, "-out", csr)
        usage = "clientAuth" if client else "serverAuth"
        ext = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if server_names:
            sans = ",".join(
                f"IP:{n}" if n.replace(".", "").isdigit() else f"DNS:{n}" for n in server_names
            )
            ext.append(f"subjectAltName={sans}")
        ext_file = self.dir / f"{name}.ext"
        ext_file.write_text("\n".join(ext) + "\n")
        _openssl(
            "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
            "-days", "3", "-sha256", "-extfile", ext_file, "-out", crt,
        )
        return crt, key


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def write_kubeconfig(path: Path, server: str, ca: Path, *, cert: Path | None = None,
                     key: Path | None = None, token: str | None = None, user: str = "user") -> Path:
    credentials: dict = {}
    if cert and key:
        credentials = {"client-certificate": str(cert), "client-key": str(key)}
    if token:
        credentials = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "wrpo-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "wrpo-test", "context": {"cluster": "wrpo-test", "user": user}}],
        "current-context": "wrpo-test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class Component:
    name: str
    process: subprocess.Popen
    log: Path


@dataclass
class Cluster:
    """A running control plane. Use `api_client()` or `kubeconfig` to talk to it."""

    bin_dir: Path
    work_dir: Path
    server: str = ""
    kubeconfig: Path = Path()
    ca_cert: Path = Path()
    components: list[Component] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    ca: CertAuthority | None = None
    #: Where PodRunners link their pods' logs for the kwok Nodes' log endpoint (k8s_logserver.py).
    pod_log_dir: Path | None = None

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    # -- lifecycle -----------------------------------------------------------------------

    def start_process(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Component:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=self.work_dir, start_new_session=True,
            )
        component = Component(name, process, log)
        self.components.append(component)
        # For a manual clean-up after a hard kill of the test process: kill $(cat pids).
        with (self.work_dir / "pids").open("a") as pids:
            pids.write(f"{process.pid}\n")
        return component

    def check_alive(self, component: Component) -> None:
        code = component.process.poll()
        if code is not None:
            raise RuntimeError(
                f"{component.name} exited with {code}; last log lines:\n{tail(component.log)}"
            )

    def wait_ready(self, component: Component, what: str, check: Callable[[], object],
                   timeout: float) -> None:
        def alive_and_ready():
            self.check_alive(component)
            return check()

        try:
            wait_for(what, alive_and_ready, timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n--- {component.log} ---\n{tail(component.log)}") from None

    def stop(self) -> None:
        """Stop every component by PID, newest first: SIGTERM, then SIGKILL after 10s."""
        for component in reversed(self.components):
            stop_process(component.process)
        self.components.clear()

    def log_tails(self, lines: int = 15) -> str:
        return "\n".join(
            f"--- {c.name} ({c.log}) ---\n{tail(c.log, lines)}" for c in self.components
        )

    # -- clients -------------------------------------------------------------------------

    def api_client(self, kubeconfig: Path | None = None):
        """A fresh `kubernetes.client.ApiClient` for this cluster (admin unless `kubeconfig`)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def kubectl_env(self) -> dict[str, str]:
        """Environment for subprocesses (helm, the operator) that should use this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 120,
                stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run the harness's kubectl (built from the same Kubernetes modules) against this cluster."""
        binary = self.bin_dir / "kubectl"
        if not binary.is_file():
            raise BinariesMissing(f"kubectl missing in {self.bin_dir}: run tests/cluster/build-binaries.sh")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig),
               "KUBECACHEDIR": str(self.work_dir / "kubectl-cache")}
        result = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True, timeout=timeout,
                                input=stdin)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def apply_yaml(self, documents: str | Path, namespace: str | None = None) -> list:
        """Create every object in a YAML string or file (server-side apply would need kubectl)."""
        from kubernetes import utils

        text = documents.read_text() if isinstance(documents, Path) else documents
        objects = [d for d in yaml.safe_load_all(text) if d]
        with contextlib.closing(self.api_client()) as api:
            return [utils.create_from_dict(api, obj, namespace=namespace) for obj in objects]


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(5)


def _https_get(url: str, ca: Path | None = None, cert: tuple[Path, Path] | None = None) -> str:
    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    if cert:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    with urllib.request.urlopen(url, context=context, timeout=5) as response:
        return response.read().decode()


def _http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


# --------------------------------------------------------------------------------------------
# Starting the control plane


def start_cluster(work_dir: Path, bin_dir: Path | None = None, *,
                  nodes: int = 3, gpus_per_node: int = 8, timeout: float = 120.0,
                  audit_policy: dict | None = None) -> Cluster:
    """Start the whole control plane; on any failure stop what was started and re-raise. `audit_policy`
    (an audit.k8s.io/v1 Policy) turns on the apiserver's audit log at `<work>/audit.log`."""
    cluster = Cluster(bin_dir=bin_dir or find_binaries(), work_dir=work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    atexit.register(cluster.stop)  # a safety net; fixtures stop the cluster themselves
    try:
        admin_cert = _start_etcd_and_apiserver(cluster, timeout, audit_policy)
        _start_controllers(cluster, admin_cert, timeout)
        _start_provisioner(cluster, timeout)
        kubelet_port = _start_log_server(cluster, timeout)
        _start_kwok(cluster, nodes, gpus_per_node, kubelet_port, timeout)
        _start_training_operator(cluster, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_api_server(work_dir: Path, bin_dir: Path | None = None, *, timeout: float = 120.0) -> Cluster:
    """Only etcd and kube-apiserver (no controllers, no Nodes): a short-lived second apiserver for what the
    session's cluster cannot hold, such as another release's CRDs of the same names. Stop it with `stop()`."""
    cluster = Cluster(bin_dir=bin_dir or find_binaries(), work_dir=work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    atexit.register(cluster.stop)
    try:
        _start_etcd_and_apiserver(cluster, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_etcd_and_apiserver(cluster: Cluster, timeout: float, audit_policy: dict | None = None
                              ) -> tuple[Path, Path]:
    b, w = cluster.bin_dir, cluster.work_dir
    pki = w / "pki"
    ca = cluster.ca = CertAuthority(pki)
    cluster.ca_cert = ca.cert
    serving = ca.issue(
        "apiserver", "/CN=kube-apiserver",
        server_names=("127.0.0.1", "localhost", "10.96.0.1", "kubernetes", "kubernetes.default",
                      "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
    )
    admin = ca.issue("admin", "/O=system:masters/CN=wrpo-admin", client=True)
    # How the apiserver reaches a real kubelet (k8s_node.py) for logs, exec and port-forward.
    kubelet_client = ca.issue("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
                              client=True)
    sa_key, sa_pub = pki / "sa.key", pki / "sa.pub"
    _openssl("genrsa", "-out", sa_key, "2048")
    _openssl("rsa", "-in", sa_key, "-pubout", "-out", sa_pub)

    client_port, peer_port = free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{client_port}"
    etcd = cluster.start_process("etcd", [
        str(b / "etcd"), "--name=wrpo-test", f"--data-dir={w / 'etcd'}",
        f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-cluster=wrpo-test=http://127.0.0.1:{peer_port}",
        "--unsafe-no-fsync=true", "--log-level=warn", "--quota-backend-bytes=2147483648",
    ])
    cluster.wait_ready(etcd, "etcd /health",
                       lambda: '"health":"true"' in _http_get(f"{etcd_url}/health"), timeout)

    port = free_port()
    cluster.server = f"https://127.0.0.1:{port}"
    apiserver = cluster.start_process("kube-apiserver", [
        str(b / "kube-apiserver"),
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
        f"--cert-dir={w / 'apiserver-certs'}",
        f"--tls-cert-file={serving[0]}", f"--tls-private-key-file={serving[1]}",
        f"--client-ca-file={ca.cert}",
        # No front proxy; set so that components reading the requestheader CA stay quiet.
        f"--requestheader-client-ca-file={ca.cert}", "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        "--authorization-mode=Node,RBAC",
        f"--kubelet-client-certificate={kubelet_client[0]}", f"--kubelet-client-key={kubelet_client[1]}",
        f"--kubelet-certificate-authority={ca.cert}", "--kubelet-preferred-address-types=InternalIP,Hostname",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--endpoint-reconciler-type=none",  # 127.0.0.1 is not a valid Endpoints address
        # The default plugins (PodSecurity among them: namespaces labelled RESTRICTED_LABELS enforce the
        # `restricted` standard) and OpenShift's rule that setting blockOwnerDeletion needs update on the
        # owner's finalizers.
        "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
        "--allow-privileged=true", "--profiling=false", "--v=1",
        *_audit_flags(w, audit_policy),
    ])
    cluster.wait_ready(
        apiserver, "kube-apiserver /readyz",
        lambda: _https_get(f"{cluster.server}/readyz", ca.cert, admin) == "ok", timeout,
    )
    cluster.kubeconfig = write_kubeconfig(w / "admin.kubeconfig", cluster.server, ca.cert,
                                          cert=admin[0], key=admin[1], user="wrpo-admin")
    return admin


def _audit_flags(work_dir: Path, policy: dict | None) -> list[str]:
    if policy is None:
        return []
    path = work_dir / "audit-policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return [f"--audit-policy-file={path}", f"--audit-log-path={work_dir / 'audit.log'}",
            "--audit-log-format=json", "--audit-log-mode=batch", "--audit-log-maxsize=1000"]


def _start_provisioner(cluster: Cluster, timeout: float) -> None:
    """k8s_provisioner.py: the default StorageClass `standard` and hostPath volumes for its claims."""
    import sys

    component = cluster.start_process("provisioner", [
        sys.executable, str(HERE / "k8s_provisioner.py"), f"--kubeconfig={cluster.kubeconfig}",
        f"--root={cluster.work_dir / 'volumes'}",
    ])
    from kubernetes import client

    with contextlib.closing(cluster.api_client()) as api:
        storage = client.StorageV1Api(api)
        cluster.wait_ready(component, "StorageClass standard",
                           lambda: storage.read_storage_class("standard"), timeout)


def _start_controllers(cluster: Cluster, admin: tuple[Path, Path], timeout: float) -> None:
    b, w, ca = cluster.bin_dir, cluster.work_dir, cluster.ca
    assert ca is not None
    kcm_cert = ca.issue("kcm", "/CN=system:kube-controller-manager", client=True)
    kcm_config = write_kubeconfig(w / "kcm.kubeconfig", cluster.server, ca.cert,
                                  cert=kcm_cert[0], key=kcm_cert[1])
    kcm_port = free_port()
    controllers = ",".join([
        "serviceaccount-token-controller", "serviceaccount-controller", "namespace-controller",
        "garbage-collector-controller", "deployment-controller", "replicaset-controller",
        "job-controller", "ttl-after-finished-controller", "endpointslice-controller",
        "endpointslice-mirroring-controller", "root-ca-certificate-publisher-controller",
        "pod-garbage-collector-controller", "statefulset-controller", "cronjob-controller",
        "resourcequota-controller", "disruption-controller", "clusterrole-aggregation-controller",
        # Lifts the node.kubernetes.io/not-ready taint once kwok reports a Node Ready, and
        # watches the Leases kwok renews.
        "node-lifecycle-controller",
        # PersistentVolumeClaims and generic ephemeral volumes (k8s_provisioner.py makes the volumes).
        "persistentvolume-binder-controller", "ephemeral-volume-controller",
        "persistentvolumeclaim-protection-controller", "persistentvolume-protection-controller",
    ])
    kcm = cluster.start_process("kube-controller-manager", [
        str(b / "kube-controller-manager"),
        f"--kubeconfig={kcm_config}", f"--authentication-kubeconfig={kcm_config}",
        f"--authorization-kubeconfig={kcm_config}",
        "--bind-address=127.0.0.1", f"--secure-port={kcm_port}", f"--cert-dir={w / 'kcm-certs'}",
        f"--controllers={controllers}",
        f"--root-ca-file={ca.cert}", f"--service-account-private-key-file={w / 'pki/sa.key'}",
        "--use-service-account-credentials=true", "--leader-elect=false",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--concurrent-gc-syncs=5", "--v=1",
    ])
    sched_cert = ca.issue("scheduler", "/CN=system:kube-scheduler", client=True)
    sched_config = write_kubeconfig(w / "scheduler.kubeconfig", cluster.server, ca.cert,
                                    cert=sched_cert[0], key=sched_cert[1])
    sched_port = free_port()
    scheduler = cluster.start_process("kube-scheduler", [
        str(b / "kube-scheduler"),
        f"--kubeconfig={sched_config}", f"--authentication-kubeconfig={sched_config}",
        f"--authorization-kubeconfig={sched_config}",
        "--bind-address=127.0.0.1", f"--secure-port={sched_port}",
        f"--cert-dir={w / 'scheduler-certs'}", "--leader-elect=false", "--v=1",
    ])
    cluster.wait_ready(kcm, "kube-controller-manager /healthz",
                       lambda: _https_get(f"https://127.0.0.1:{kcm_port}/healthz") == "ok", timeout)
    cluster.wait_ready(scheduler, "kube-scheduler /readyz",
                       lambda: _https_get(f"https://127.0.0.1:{sched_port}/readyz") == "ok", timeout)

    # The default ServiceAccount shows up once the token and SA controllers run.
    from kubernetes import client

    with contextlib.closing(cluster.api_client()) as api:
        core = client.CoreV1Api(api)
        cluster.wait_ready(kcm, "ServiceAccount default/default",
                           lambda: core.read_namespaced_service_account("default", "default"), timeout)


def fake_node(name: str, *, cpu: str = "32", memory: str = "256Gi", gpus: int = 8,
              labels: dict[str, str] | None = None) -> dict:
    """A Node object kwok will manage (the annotation) with the given capacity."""
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus)}
    key, value = KWOK_NODE_ANNOTATION
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "type": "kwok", **(labels or {})},
        },
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def _start_log_server(cluster: Cluster, timeout: float) -> int:
    """The kwok Nodes' kubelet log endpoint (k8s_logserver.py) on 127.0.0.1 with a certificate of the harness
    CA, serving `cluster.pod_log_dir`; returns its port (kwok advertises it as every kwok Node's kubelet)."""
    cluster.pod_log_dir = cluster.work_dir / "pod-logs"
    cert_dir = _serving_cert_dir(cluster, "pod-logs")
    port = free_port()
    server = cluster.start_process("pod-logs", [
        sys.executable, str(HERE / "k8s_logserver.py"), f"--port={port}", f"--cert={cert_dir / 'tls.crt'}",
        f"--key={cert_dir / 'tls.key'}", f"--dir={cluster.pod_log_dir}",
    ])
    assert cluster.ca is not None
    cluster.wait_ready(server, "pod log server /healthz",
                       lambda: _https_get(f"https://127.0.0.1:{port}/healthz", cluster.ca.cert) == "ok", timeout)
    return port


def _start_kwok(cluster: Cluster, nodes: int, gpus_per_node: int, kubelet_port: int, timeout: float) -> None:
    """kwok with the Stages of kwok/stages.yaml; its Nodes are at 127.0.0.1 with the kubelet port of the pod log
    server, so the apiserver serves the logs of the pods a PodRunner ran."""
    key, value = KWOK_NODE_ANNOTATION
    kwok = cluster.start_process("kwok", [
        str(cluster.bin_dir / "kwok"), f"--kubeconfig={cluster.kubeconfig}",
        f"--config={STAGES_FILE}", "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={key}={value}",
        f"--cidr={POD_CIDR}", "--node-ip=127.0.0.1", f"--node-port={kubelet_port}",
        # kwok's own server (without it kwok would listen on 0.0.0.0:<node-port> itself).
        f"--server-address=127.0.0.1:{free_port()}", "--node-lease-duration-seconds=40",
    ])
    from kubernetes import client

    with contextlib.closing(cluster.api_client()) as api:
        core = client.CoreV1Api(api)
        for i in range(nodes):
            node = fake_node(f"kwok-node-{i}", gpus=gpus_per_node)
            core.create_node(node)
            cluster.nodes.append(node["metadata"]["name"])

        def all_ready():
            ready = 0
            for node in core.list_node(label_selector="type=kwok").items:
                conditions = {c.type: c.status for c in node.status.conditions or []}
                tainted = any(t.key == "node.kubernetes.io/not-ready" for t in node.spec.taints or [])
                ready += conditions.get("Ready") == "True" and not tainted
            return ready == nodes

        cluster.wait_ready(kwok, f"{nodes} kwok Nodes Ready and untainted", all_ready, timeout)


def _start_training_operator(cluster: Cluster, timeout: float) -> None:
    """Install the training-operator CRDs and run its PyTorchJob controller and webhook.

    The webhook serves on 127.0.0.1 with a certificate from the test CA; a
    ValidatingWebhookConfiguration with a URL client config points the apiserver at it.
    """
    from kubernetes import client

    ca = cluster.ca
    assert ca is not None
    crd_dir = cluster.bin_dir / "training-operator-crds"
    with contextlib.closing(cluster.api_client()) as api:
        ext = client.ApiextensionsV1Api(api)
        for path in sorted(crd_dir.glob("*.yaml")):
            ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))

        def established():
            crd = ext.read_custom_resource_definition("pytorchjobs.kubeflow.org")
            return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

        wait_for("PyTorchJob CRD Established", established, timeout)

    cert_dir = cluster.work_dir / "training-operator-certs"
    cert_dir.mkdir(exist_ok=True)
    crt, key = ca.issue("training-operator", "/CN=training-operator", server_names=("127.0.0.1",))
    (cert_dir / "tls.crt").write_bytes(crt.read_bytes())
    (cert_dir / "tls.key").write_bytes(key.read_bytes())
    webhook_port, probe_port = free_port(), free_port()
    operator = cluster.start_process("training-operator", [
        str(cluster.bin_dir / "training-operator-local"), "--enable-scheme=pytorchjob",
        "--bind-host=127.0.0.1", f"--webhook-server-port={webhook_port}", f"--cert-dir={cert_dir}",
        f"--health-probe-bind-address=127.0.0.1:{probe_port}", "--zap-log-level=info",
    ], env=cluster.kubectl_env())
    cluster.wait_ready(operator, "training-operator /readyz",
                       lambda: _http_get(f"http://127.0.0.1:{probe_port}/readyz") == "ok", timeout)
    webhook = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "validator.training-operator.kubeflow.org"},
        "webhooks": [{
            "name": "validator.pytorchjob.training-operator.kubeflow.org",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "clientConfig": {
                "url": f"https://127.0.0.1:{webhook_port}{PYTORCHJOB_WEBHOOK_PATH}",
                "caBundle": base64.b64encode(ca.cert.read_bytes()).decode(),
            },
            "rules": [{"apiGroups": ["kubeflow.org"], "apiVersions": ["v1"],
                       "operations": ["CREATE", "UPDATE"], "resources": ["pytorchjobs"]}],
        }],
    }
    with contextlib.closing(cluster.api_client()) as api:
        client.AdmissionregistrationV1Api(api).create_validating_webhook_configuration(webhook)


# --------------------------------------------------------------------------------------------
# Identities, Helm


@dataclass
class ServiceAccountIdentity:
    """Credentials of a ServiceAccount (a TokenRequest token): RBAC applies to them."""

    namespace: str
    name: str
    token: str
    kubeconfig: Path
    cluster: Cluster

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    def api_client(self):
        return self.cluster.api_client(self.kubeconfig)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should act as this ServiceAccount."""
        return {"KUBECONFIG": str(self.kubeconfig)}


def service_account_identity(cluster: Cluster, namespace: str, name: str, *,
                             create: bool = True, expiration_seconds: int = 3600) -> ServiceAccountIdentity:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with contextlib.closing(cluster.api_client()) as api:
        core = client.CoreV1Api(api)
        if create:
            try:
                core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
            except ApiException as e:
                if e.status != 409:
                    raise
        request = core.create_namespaced_service_account_token(
            name, namespace, {"spec": {"expirationSeconds": expiration_seconds}}
        )
    token = request.status.token
    path = cluster.work_dir / f"sa-{namespace}-{name}.kubeconfig"
    write_kubeconfig(path, cluster.server, cluster.ca_cert, token=token, user=f"{namespace}-{name}")
    return ServiceAccountIdentity(namespace, name, token, path, cluster)


@dataclass
class HelmRelease:
    name: str
    namespace: str
    chart: Path
    status: dict


class Helm:
    """The built helm binary pointed at the cluster, with its caches in the work dir."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        home = cluster.work_dir / "helm"
        self.env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str, timeout: float = 300) -> str:
        argv = [str(self.cluster.bin_dir / "helm"), *args]
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout

    def install(self, release: str, chart: Path, namespace: str, *, values: dict | None = None,
                wait: bool = False, timeout: str = "120s", extra_args: tuple[str, ...] = ()) -> HelmRelease:
        args = ["install", release, str(chart), "--namespace", namespace, "--create-namespace"]
        if values:
            values_file = self.cluster.work_dir / f"values-{namespace}-{release}.yaml"
            values_file.write_text(yaml.safe_dump(values))
            args += ["--values", str(values_file)]
        if wait:
            args += ["--wait", "--timeout", timeout]
        self.run(*args, *extra_args)
        status = json.loads(self.run("status", release, "--namespace", namespace, "-o", "json"))
        return HelmRelease(release, namespace, chart, status)

    def uninstall(self, release: str, namespace: str) -> None:
        self.run("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s")


@contextlib.contextmanager
def running_cluster(work_dir: Path, **kwargs) -> Iterator[Cluster]:
    """Start a cluster for a `with` block; stopped on exit, also on Ctrl-C and errors."""
    cluster = start_cluster(work_dir, **kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------------------------
# Optional controllers: JobSet, Kubeflow Trainer v2, Kueue (tests/cluster/build-controllers.sh)
#
# Started only when asked (`start_controllers`, fixture `k8s_controllers`), on a running cluster. Each
# gets its CRDs from the module it was built from, serves its webhooks on 127.0.0.1 with a certificate of
# the harness CA (their own certificate rotation is off), and the webhook configurations of its release
# manifests are registered with URL client configs; metrics and health listeners are on 127.0.0.1,
# leader election is off. They run as the admin (as the training-operator does). See docs/cluster-harness.md.

#: The controllers `start_controllers` knows, in start order (Trainer needs JobSet's CRD and controller;
#: Kueue's integrations need the CRDs of the kinds it manages).
CONTROLLERS = ("jobset", "trainer", "kueue")
#: Kueue's integrations a FusionRun needs (batch Jobs, the pods of vLLM Deployments, PyTorchJob, TrainJob),
#: plus JobSet, which Kueue enables by default and whose JobSets Trainer creates.
KUEUE_FRAMEWORKS = ("batch/job", "pod", "deployment", "kubeflow.org/pytorchjob",
                    "trainer.kubeflow.org/trainjob", "jobset.x-k8s.io/jobset")
#: The Kueue API version v0.17 stores and serves (v1beta1 is still served, converted by Kueue's webhook).
KUEUE_API = ("kueue.x-k8s.io", "v1beta2")
KUEUE_NAMESPACE = "kueue-system"
#: Kueue manages Jobs, pods and Deployments only in namespaces with this label (`managedJobsNamespaceSelector`,
#: which v0.17 always respects), so the session's other tests, whose children carry queue labels without a
#: Kueue to admit them, run as before. Fixture `kueue_namespace` makes such a namespace with a LocalQueue.
KUEUE_NAMESPACE_LABEL = ("wrpo.test/kueue", "true")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_CLUSTER_QUEUE = "wrpo-cluster-queue"
KUEUE_LOCAL_QUEUE = "wrpo-queue"
KUEUE_FLAVOR = "default-flavor"
#: The ClusterQueue's nominal quota: 8 GPUs (one kwok Node's worth), CPU and memory of the three Nodes.
KUEUE_QUOTA = {"cpu": "96", "memory": "768Gi", "nvidia.com/gpu": "8"}
TRAINER_API = ("trainer.kubeflow.org", "v1alpha1")
JOBSET_API = ("jobset.x-k8s.io", "v1alpha2")
# Kueue's CRDs that its release installs with a conversion webhook (config/components/crd/kustomization.yaml).
_KUEUE_CONVERTED_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
# The selectors the releases' kustomizations patch into their webhook manifests: JobSet's pod webhooks only
# see JobSet pods, Kueue's pod/Deployment/StatefulSet webhooks skip kube-system and Kueue's namespace.
_JOBSET_POD_SELECTOR = {"objectSelector": {"matchExpressions": [
    {"key": "jobset.sigs.k8s.io/jobset-name", "operator": "Exists"}]}}
# Kueue's release limits its pod, Deployment and StatefulSet webhooks to namespaces other than kube-system and
# its own; here every webhook of a Kueue integration (not those of Kueue's own kinds) is limited to the
# namespaces KUEUE_NAMESPACE_LABEL opts in, which excludes those two as well.
_KUEUE_NAMESPACE_SELECTOR = {"namespaceSelector": {"matchLabels": dict([KUEUE_NAMESPACE_LABEL])}}
_WEBHOOK_PATCHES = {
    "jobset": {"mpod.kb.io": _JOBSET_POD_SELECTOR, "vpod.kb.io": _JOBSET_POD_SELECTOR},
}
_CONTROLLER_FILES = {
    "jobset": ("jobset", "jobset-crds", "webhooks/jobset.yaml"),
    "trainer": ("trainer-local", "trainer-crds", "webhooks/trainer.yaml"),
    "kueue": ("kueue", "kueue-crds", "webhooks/kueue.yaml"),
}


class ControllersMissing(BinariesMissing):
    """The optional controllers are not built (run tests/cluster/build-controllers.sh)."""


def find_controllers(names: tuple[str, ...] = CONTROLLERS) -> Path:
    """The directory of build-controllers.sh's output: $WRPO_CONTROLLERS_BIN, else the cache's
    `controllers/current` link; raises ControllersMissing naming what is not there."""
    configured = os.environ.get("WRPO_CONTROLLERS_BIN")
    cache = bin_cache() / "controllers"
    bin_dir = Path(configured) if configured else cache / "current"
    missing = [f for name in names for f in _CONTROLLER_FILES[name] if not (bin_dir / f).exists()]
    if missing:
        source = "WRPO_CONTROLLERS_BIN" if configured else f"{cache}/current (WRPO_CONTROLLERS_BIN unset)"
        raise ControllersMissing(
            f"controllers missing in {bin_dir} [{source}]: {', '.join(missing)}; build them with "
            "tests/cluster/build-controllers.sh and export WRPO_CONTROLLERS_BIN=<dir>"
        )
    return bin_dir


def controller_versions(bin_dir: Path) -> dict[str, str]:
    """The versions build-controllers.sh built into `bin_dir` (its versions.env: TRAINER_VERSION,
    JOBSET_VERSION, KUEUE_VERSION, TRAINER_COMPAT_VERSION, GO_VERSION)."""
    lines = (bin_dir / "versions.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def trainer_compat_crds(bin_dir: Path) -> Path:
    """The CRDs of the oldest Trainer release the harness keeps (no controller), for a second apiserver
    (`start_api_server`): the same CRD names as the running Trainer's, so not on the session's cluster."""
    version = controller_versions(bin_dir).get("TRAINER_COMPAT_VERSION", "")
    crds = bin_dir / f"trainer-crds-{version}"
    if not version or not crds.is_dir():
        raise ControllersMissing(f"no older Trainer CRDs in {bin_dir}; run tests/cluster/build-controllers.sh")
    return crds


@dataclass
class Controllers:
    """What `start_controllers` started on a cluster."""

    cluster: Cluster
    bin_dir: Path
    names: tuple[str, ...]
    cluster_queue: str = KUEUE_CLUSTER_QUEUE

    def local_queue(self, namespace: str, name: str = KUEUE_LOCAL_QUEUE) -> dict:
        """A Kueue LocalQueue `name` in `namespace` that feeds the harness's ClusterQueue."""
        return create_local_queue(self.cluster, namespace, name, self.cluster_queue)


def start_controllers(cluster: Cluster, names: tuple[str, ...] = CONTROLLERS, *, bin_dir: Path | None = None,
                      timeout: float = 120.0) -> Controllers:
    """Install the CRDs of `names` (JobSet, Trainer, Kueue; Trainer brings JobSet) and run their controllers
    on `cluster`; Kueue also gets the ClusterQueue KUEUE_CLUSTER_QUEUE. Processes join the cluster's
    components (stopped with it)."""
    wanted = set(names) | ({"jobset"} if "trainer" in names else set())
    unknown = wanted - set(CONTROLLERS)
    if unknown:
        raise ValueError(f"unknown controllers {sorted(unknown)}; known: {', '.join(CONTROLLERS)}")
    ordered = tuple(n for n in CONTROLLERS if n in wanted)
    bin_dir = bin_dir or find_controllers(ordered)
    starters = {"jobset": _start_jobset, "trainer": _start_trainer, "kueue": _start_kueue}
    for name in ordered:
        starters[name](cluster, bin_dir, timeout)
    return Controllers(cluster, bin_dir, ordered)


def _serving_cert_dir(cluster: Cluster, name: str) -> Path:
    """tls.crt/tls.key for 127.0.0.1 from the harness CA, in <work>/<name>-certs."""
    assert cluster.ca is not None
    cert_dir = cluster.work_dir / f"{name}-certs"
    cert_dir.mkdir(exist_ok=True)
    crt, key = cluster.ca.issue(name, f"/CN={name}", server_names=("127.0.0.1",))
    (cert_dir / "tls.crt").write_bytes(crt.read_bytes())
    (cert_dir / "tls.key").write_bytes(key.read_bytes())
    return cert_dir


def install_crds(cluster: Cluster, crd_dir: Path, timeout: float, conversion_port: int | None = None,
                  converted: tuple[str, ...] = ()) -> None:
    """Create every CRD of `crd_dir` and wait until each is Established. CRDs whose plural is in `converted`
    get a conversion webhook at https://127.0.0.1:<conversion_port>/convert, as their release installs them."""
    from kubernetes import client

    assert cluster.ca is not None
    ca_bundle = base64.b64encode(cluster.ca.cert.read_bytes()).decode()
    names = []
    with contextlib.closing(cluster.api_client()) as api:
        ext = client.ApiextensionsV1Api(api)
        for path in sorted(crd_dir.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            if crd["spec"]["names"]["plural"] in converted:
                crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                    "conversionReviewVersions": ["v1"],
                    "clientConfig": {"url": f"https://127.0.0.1:{conversion_port}/convert", "caBundle": ca_bundle},
                }}
            ext.create_custom_resource_definition(crd)
            names.append(crd["metadata"]["name"])

        def established():
            for name in names:
                crd = ext.read_custom_resource_definition(name)
                if not any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
                    return False
            return True

        wait_for(f"CRDs of {crd_dir.name} Established", established, timeout)


def _register_webhooks(cluster: Cluster, name: str, manifest: Path, port: int) -> list[str]:
    """Create the Mutating/ValidatingWebhookConfigurations of a release's webhook manifest (named
    `<name>-<kind>`), each webhook pointed at https://127.0.0.1:<port><its path> with the harness CA,
    with the selectors of the release's kustomization (_WEBHOOK_PATCHES; Kueue's integrations: only the
    namespaces labelled KUEUE_NAMESPACE_LABEL). Returns the webhook names."""
    from kubernetes import client

    assert cluster.ca is not None
    ca_bundle = base64.b64encode(cluster.ca.cert.read_bytes()).decode()
    registered = []
    with contextlib.closing(cluster.api_client()) as api:
        admission = client.AdmissionregistrationV1Api(api)
        for document in yaml.safe_load_all(manifest.read_text()):
            if not document:
                continue
            kind = document["kind"]
            document["metadata"] = {"name": f"{name}-{kind.removesuffix('WebhookConfiguration').lower()}"}
            for webhook in document["webhooks"]:
                path = webhook["clientConfig"]["service"]["path"]
                webhook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}
                webhook["timeoutSeconds"] = 10
                webhook.update(_WEBHOOK_PATCHES.get(name, {}).get(webhook["name"], {}))
                groups = {g for rule in webhook.get("rules", []) for g in rule.get("apiGroups", [])}
                if name == "kueue" and KUEUE_API[0] not in groups:
                    webhook.update(_KUEUE_NAMESPACE_SELECTOR)
                registered.append(webhook["name"])
            if kind == "MutatingWebhookConfiguration":
                admission.create_mutating_webhook_configuration(document)
            elif kind == "ValidatingWebhookConfiguration":
                admission.create_validating_webhook_configuration(document)
            else:
                raise ValueError(f"{manifest}: unexpected kind {kind}")
    return registered


def _start_jobset(cluster: Cluster, bin_dir: Path, timeout: float) -> None:
    """JobSet's stock controller manager with a Configuration file (config.jobset.x-k8s.io/v1alpha1)."""
    install_crds(cluster, bin_dir / "jobset-crds", timeout)
    webhook_port, probe_port, metrics_port = free_port(), free_port(), free_port()
    config = {
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(_serving_cert_dir(cluster, "jobset"))},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
    }
    config_file = cluster.work_dir / "jobset-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    jobset = cluster.start_process("jobset", [
        str(bin_dir / "jobset"), f"--config={config_file}", "--zap-log-level=info",
    ], env=cluster.kubectl_env())
    cluster.wait_ready(jobset, "jobset /readyz",
                       lambda: _http_get(f"http://127.0.0.1:{probe_port}/readyz") == "ok", timeout)
    _register_webhooks(cluster, "jobset", bin_dir / "webhooks/jobset.yaml", webhook_port)


def trainer_configuration(*, webhook_port: int, probe_port: int, metrics_port: int) -> dict:
    """Trainer's Configuration (config.trainer.kubeflow.org/v1alpha1, the file v2.2's stock controller manager
    reads) for the harness: every listener on 127.0.0.1, no leader election, certificate
    management off (trainer-local takes the certificate from --cert-dir)."""
    return {
        "apiVersion": "config.trainer.kubeflow.org/v1alpha1", "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "certManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}", "secureServing": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
    }


def _start_trainer(cluster: Cluster, bin_dir: Path, timeout: float) -> None:
    """Trainer v2 (trainer-local: the stock controllers and webhooks, configured by the stock Configuration
    file, certificate from a directory)."""
    install_crds(cluster, bin_dir / "trainer-crds", timeout)
    webhook_port, probe_port, metrics_port = free_port(), free_port(), free_port()
    config_file = cluster.work_dir / "trainer-config.yaml"
    config_file.write_text(yaml.safe_dump(trainer_configuration(
        webhook_port=webhook_port, probe_port=probe_port, metrics_port=metrics_port)))
    trainer = cluster.start_process("trainer", [
        str(bin_dir / "trainer-local"), f"--config={config_file}",
        f"--cert-dir={_serving_cert_dir(cluster, 'trainer')}", "--zap-log-level=info",
    ], env=cluster.kubectl_env())
    cluster.wait_ready(trainer, "trainer /readyz",
                       lambda: _http_get(f"http://127.0.0.1:{probe_port}/readyz") == "ok", timeout)
    _register_webhooks(cluster, "trainer", bin_dir / "webhooks/trainer.yaml", webhook_port)


def kueue_configuration(*, webhook_port: int, probe_port: int, metrics_port: int, cert_dir: Path,
                        frameworks: tuple[str, ...] = KUEUE_FRAMEWORKS) -> dict:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2, the version v0.17 reads) for the harness."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "manageJobsWithoutQueueName": False,
        "managedJobsNamespaceSelector": {"matchLabels": dict([KUEUE_NAMESPACE_LABEL])},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
        # The visibility API server (an aggregated API on its own port, every interface) is not needed.
        "featureGates": {"VisibilityOnDemand": False},
        "integrations": {"frameworks": list(frameworks)},
    }


def _start_kueue(cluster: Cluster, bin_dir: Path, timeout: float) -> None:
    """Kueue's stock controller manager (built with its metrics certificate folder from
    $KUEUE_METRICS_CERT_DIR, see build-controllers.sh), its ResourceFlavor and the ClusterQueue."""
    from kubernetes import client

    webhook_port, probe_port, metrics_port = free_port(), free_port(), free_port()
    install_crds(cluster, bin_dir / "kueue-crds", timeout, conversion_port=webhook_port,
                  converted=_KUEUE_CONVERTED_CRDS)
    with contextlib.closing(cluster.api_client()) as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": KUEUE_NAMESPACE}})
    cert_dir = _serving_cert_dir(cluster, "kueue")
    config_file = cluster.work_dir / "kueue-config.yaml"
    config_file.write_text(yaml.safe_dump(kueue_configuration(
        webhook_port=webhook_port, probe_port=probe_port, metrics_port=metrics_port, cert_dir=cert_dir)))
    kueue = cluster.start_process("kueue", [
        str(bin_dir / "kueue"), f"--config={config_file}", "--zap-log-level=info",
    ], env={**cluster.kubectl_env(), "KUEUE_METRICS_CERT_DIR": str(cert_dir)})
    cluster.wait_ready(kueue, "kueue /readyz",
                       lambda: _http_get(f"http://127.0.0.1:{probe_port}/readyz") == "ok", timeout)
    _register_webhooks(cluster, "kueue", bin_dir / "webhooks/kueue.yaml", webhook_port)
    group, version = KUEUE_API
    with contextlib.closing(cluster.api_client()) as api:
        custom = client.CustomObjectsApi(api)
        custom.create_cluster_custom_object(group, version, "resourceflavors", {
            "apiVersion": f"{group}/{version}", "kind": "ResourceFlavor", "metadata": {"name": KUEUE_FLAVOR}})
        custom.create_cluster_custom_object(group, version, "clusterqueues", {
            "apiVersion": f"{group}/{version}", "kind": "ClusterQueue", "metadata": {"name": KUEUE_CLUSTER_QUEUE},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [{
                    "coveredResources": list(KUEUE_QUOTA),
                    "flavors": [{"name": KUEUE_FLAVOR, "resources": [
                        {"name": resource, "nominalQuota": quota} for resource, quota in KUEUE_QUOTA.items()]}],
                }],
            },
        })

        def active():
            queue = custom.get_cluster_custom_object(group, version, "clusterqueues", KUEUE_CLUSTER_QUEUE)
            return any(c["type"] == "Active" and c["status"] == "True"
                       for c in queue.get("status", {}).get("conditions", []))

        cluster.wait_ready(kueue, f"ClusterQueue {KUEUE_CLUSTER_QUEUE} Active", active, timeout)


def create_local_queue(cluster: Cluster, namespace: str, name: str = KUEUE_LOCAL_QUEUE,
                       cluster_queue: str = KUEUE_CLUSTER_QUEUE) -> dict:
    """A Kueue LocalQueue in `namespace` feeding `cluster_queue`; Jobs name it in KUEUE_QUEUE_LABEL."""
    from kubernetes import client

    group, version = KUEUE_API
    with contextlib.closing(cluster.api_client()) as api:
        return client.CustomObjectsApi(api).create_namespaced_custom_object(group, version, namespace, "localqueues", {
            "apiVersion": f"{group}/{version}", "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue},
        })
