"""Run pods' real commands as local processes, standing in for a kubelet.

For every pod that matches a namespace and label selector (and that the scheduler has bound to
a Node), the runner starts the first container's command + args as a subprocess with the pod's
environment (plain values, Secret/ConfigMap references, the downward API), plus overrides (for
instance S3 endpoints of a local SeaweedFS). Each pod gets its own loopback address 127.A.B.N, where
127.A.B is drawn at random per runner (all of 127/8 is loopback on Linux): "0.0.0.0" in its arguments
becomes that address, so two model servers can both listen on port 8000, also beside another test
session's pods on the same machine (a fixed 127.0.0.N would collide with them), and URLs naming a
Service of the namespace (http://svc, http://svc.ns.svc.cluster.local:80) are rewritten to the address
and target port of a local pod the Service selects (or to the `host_map` entry given for it). A headless
Service's URLs stay as they are: its name resolves, in the runner's Python processes, to the addresses of
its Ready local pods, as cluster DNS answers it (the stand-in: podrunner_site/sitecustomize.py reads the
table `<log_dir>/cluster-dns.json` the runner keeps current), so a client sees every replica behind it and a
deleted one drops out. A pod with `hostname` and `subdomain` under a headless Service of that name (JobSet's
pods: `<jobset>-node-0-0.<jobset>`) has its own name, `<hostname>.<subdomain>[.<ns>[.svc[.cluster.local]]]`,
as in cluster DNS: in that table, and as a whole value (PET_MASTER_ADDR) rewritten to its address, since
torchrun's rendezvous store resolves it in C++, which the stand-in does not reach; such a pod starts once the
pod its PET_MASTER_ADDR names is known (`_awaits_master`; a finished master counts). A MOCK of cluster DNS.

The runner writes pod status through the status subresource:
Running (Ready after the readiness probe passes), then Succeeded or Failed with the exit code in
containerStatuses, and as message what the container wrote to its termination log (a file that
`$WRPO_TERMINATION_LOG` names, as the kubelet's /dev/termination-log) or else the tail of its log.
Pods with restartPolicy Always (Deployments) are restarted when their process exits and killed when
the pod is deleted. Output goes to `<log_dir>/<namespace>_<pod>.log`.

Init containers run one after another before the main container, as a kubelet runs them. Volumes
become folders of the pod's work folder: an emptyDir is an empty one (shared by the pod's
containers) and so is a generic ephemeral volume, a PersistentVolumeClaim is one folder per claim
(kept across pods), a ConfigMap or Secret is materialised into one (all keys, or its `items`); their
mountPaths in a container's command, args and env values are rewritten to those folders, and a mount
inside another one is a symbolic link in the outer folder. Each pod gets a temporary folder of its own, as
a container has its own /tmp (`TMPDIR`, and vLLM's socket folder: `wrpo.data.serving.private_temp_environment`;
a pod's own env wins), removed when the pod ends, so what its processes leave there goes with it.

Keep kwok off these pods: put them in a namespace named "local-*" or label them
wrpo.test/local=true (see kwok/stages.yaml).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from k8s_harness import stop_process, tail

from wrpo.data.serving import private_temp_environment

_DRAWS = random.SystemRandom()

#: imported first by the runner's Python processes: the cluster-DNS stand-in (its sitecustomize.py)
SITE_DIR = Path(__file__).resolve().parent / "podrunner_site"


def _shell(argv: list[str]) -> list[str]:
    """`sh` as is, except the training-operator's init container of PyTorchJob workers (`nslookup` of the
    master's Service in a loop): this runner resolves Service names itself, to addresses it hands out when
    it first sees a pod, so there is nothing to wait for (the workers' torchrun waits for the master's
    rendezvous store)."""
    if len(argv) == 3 and argv[1] == "-c" and "nslookup" in argv[2] and "waiting for master" in argv[2]:
        return [sys.executable, "-c", "pass"]
    return argv


#: Starts the line the runner writes into a pod's log before each process (time and argv); not the
#: container's output, so the kubelet log endpoint (k8s_logserver.py) leaves these lines out.
STEP_MARKER = "### wrpo-podrunner"

DEFAULT_COMMAND_MAP = {"python": [sys.executable], "python3": [sys.executable], "sh": _shell}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Step:
    """One container of a pod as a process: its name, argv and environment."""

    container: str
    argv: list[str]
    env: dict[str, str]


@dataclass
class LocalPod:
    namespace: str
    name: str
    uid: str
    ip: str
    log: Path
    restart_always: bool
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    readiness: dict | None
    image: str = ""
    container: str = ""
    init: list[Step] = field(default_factory=list)  # init containers still to run, in order
    main: Step | None = None
    process: subprocess.Popen | None = None
    restarts: int = 0
    ready: bool = False
    finished: bool = False
    started_at: str = ""
    tmp: Path | None = None  # the pod's own temporary folder (short: vLLM binds Unix sockets in it)

    def remove_tmp(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    @property
    def termination_log(self) -> Path:
        """The container's terminationMessagePath (`$WRPO_TERMINATION_LOG` points wrpo's `stage` at it)."""
        return self.workdir / "termination-log"


@dataclass
class PodRunner:
    """Run matching pods locally; use as a context manager or call start()/stop()."""

    api_client: object
    namespace: str
    log_dir: Path
    label_selector: str = ""
    env_overrides: dict[str, str] = field(default_factory=dict)
    host_map: dict[str, str] = field(default_factory=dict)
    #: argv[0] → the local program (a list replacing argv[0]), or a callable mapping the whole argv
    command_map: dict[str, list[str] | Callable[[list[str]], list[str]]] = field(
        default_factory=lambda: dict(DEFAULT_COMMAND_MAP))
    image_entrypoints: dict[str, list[str]] = field(default_factory=dict)
    extra_path: list[str] = field(default_factory=lambda: [str(Path(sys.executable).parent)])
    poll_interval: float = 0.3
    grace_seconds: float = 10.0
    first_ip: int = 10
    #: Where each pod's log gets a link `<namespace>_<pod>.log` (the cluster's `pod_log_dir`, served to the
    #: apiserver as the kwok Nodes' kubelet log endpoint by k8s_logserver.py, so `kubectl logs` reads it).
    log_links: Path | None = None
    #: the first three octets of the pods' addresses (see the module docstring)
    # drawn from the OS, not the global generator, which a test may have seeded as another session's did
    subnet: str = field(default_factory=lambda: f"127.{_DRAWS.randint(1, 254)}.{_DRAWS.randint(0, 255)}")

    def __post_init__(self):
        from kubernetes import client

        self.core = client.CoreV1Api(self.api_client)
        self.pods: dict[str, LocalPod] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_ip = self.first_ip
        self._labels: dict[str, dict[str, str]] = {}
        self._policies: dict[str, str] = {}
        self._targets: dict[str, str] = {}
        self._headless: set[str] = set()  # Services whose URLs stay: their names resolve (`dns_table`)
        self._dns: dict[str, list[str]] = {}
        self._addresses: dict[str, str] = {}  # pod name → <subnet>.N, from the first time it is listed
        self._hostnames: dict[str, tuple[str, str]] = {}  # pod name → (spec.hostname, spec.subdomain)
        self._pod_hosts: dict[str, str] = {}  # a pod's DNS names → its address (`_host_names`)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # -- public API ------------------------------------------------------------------------

    def start(self) -> PodRunner:
        self._thread = threading.Thread(target=self._loop, name="pod-runner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(30)
        for pod in self.pods.values():
            if pod.process:
                stop_process(pod.process, self.grace_seconds)
            pod.remove_tmp()

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, pod_name: str) -> str:
        pod = self.pods.get(pod_name)
        return pod.log.read_text(errors="replace") if pod and pod.log.exists() else ""

    @property
    def dns_table(self) -> Path:
        """The cluster-DNS stand-in's answers: host name of a headless Service → its Ready pods' addresses."""
        return self.log_dir / "cluster-dns.json"

    def log_tails(self, lines: int = 30) -> str:
        parts = [f"--- pod {p.name} ({p.log}) ---\n{tail(p.log, lines)}" for p in self.pods.values()]
        parts += [f"runner error: {e}" for e in self.errors]
        return "\n".join(parts)

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 - keep running; the test sees the error list
                self.errors.append(f"{type(e).__name__}: {e}")
            self._stop.wait(self.poll_interval)

    def _tick(self) -> None:
        listed = self.core.list_namespaced_pod(self.namespace, label_selector=self.label_selector)
        self._labels = {p.metadata.name: p.metadata.labels or {} for p in listed.items}
        self._policies = {p.metadata.name: p.spec.restart_policy for p in listed.items}
        self._hostnames = {p.metadata.name: (p.spec.hostname, p.spec.subdomain) for p in listed.items
                           if p.spec.hostname and p.spec.subdomain}
        for pod in listed.items:  # before any launch: a Service resolves whatever order pods start in
            self._address(pod.metadata.name)
        seen = set()
        for pod in listed.items:
            seen.add(pod.metadata.name)
            local = self.pods.get(pod.metadata.name)
            if local and local.uid != pod.metadata.uid:  # same name, new pod
                self._kill(local)
                local = None
            if pod.metadata.deletion_timestamp:
                if local:
                    self._kill(local)
                self._force_delete(pod)
                continue
            if local is None:
                if pod.spec.node_name and pod.status.phase == "Pending" and not self._awaits_master(pod):
                    self._launch(pod)
                continue
            self._supervise(local)
        for name, local in list(self.pods.items()):
            if name not in seen and local.process and local.process.poll() is None:
                self._kill(local)
        self._publish_dns()

    def _publish_dns(self) -> None:
        """Each headless Service's names (svc, svc.ns, svc.ns.svc, svc.ns.svc.cluster.local) → the addresses
        of the Ready local pods it selects, as CoreDNS answers them; the file is replaced whole on a change."""
        import json

        table: dict[str, list[str]] = {}
        services = self.core.list_namespaced_service(self.namespace).items
        for svc in services:
            if svc.spec.cluster_ip != "None" or not svc.spec.selector:
                continue
            ready = [p.ip for p in self.pods.values() if p.ready and not p.finished
                     and self._labels_match(p.name, svc.spec.selector)]
            base = f"{svc.metadata.name}.{svc.metadata.namespace}"
            for name in (svc.metadata.name, base, f"{base}.svc", f"{base}.svc.cluster.local"):
                table[name] = sorted(ready)
        # each running pod's own names (publishNotReadyAddresses, as JobSet's Service has, or once Ready)
        published = {svc.metadata.name for svc in services if svc.spec.publish_not_ready_addresses}
        running = [p for p in self.pods.values() if not p.finished
                   and (p.ready or self._hostnames.get(p.name, ("", ""))[1] in published)]
        for name, ip in self._host_names(services, [p.name for p in running]).items():
            table[name] = [ip]
        if table != self._dns:
            tmp = self.dns_table.with_suffix(".tmp")
            tmp.write_text(json.dumps(table))
            tmp.replace(self.dns_table)
            self._dns = table

    def _awaits_master(self, pod) -> bool:
        """A PyTorchJob pod names its master's Service in MASTER_ADDR; the training-operator creates the
        Services just after the pods, so such a pod starts once that Service exists (in a cluster, DNS
        would answer a moment later; here the name is resolved once, when the pod starts). A JobSet pod
        (Trainer v2) names its master pod, `<hostname>.<subdomain>` under its own subdomain, in
        PET_MASTER_ADDR: it starts once that pod is listed and the headless Service exists (the Indexed
        Job may create the worker first)."""
        job = (pod.metadata.labels or {}).get("training.kubeflow.org/job-name")
        if job:
            names = {s.metadata.name for s in self.core.list_namespaced_service(self.namespace).items}
            return f"{job}-master-0" not in names
        master = next((e.value for e in pod.spec.containers[0].env or []
                       if e.name == "PET_MASTER_ADDR" and e.value), None)
        if not pod.spec.subdomain or not master or master.split(".")[1:2] != [pod.spec.subdomain]:
            return False
        services = self.core.list_namespaced_service(self.namespace).items
        return master not in self._known_hosts(services, self._unfinished())

    def _address(self, pod_name: str) -> str:
        """The pod's loopback address, handed out the first time the runner sees it."""
        if pod_name not in self._addresses:
            if self._next_ip > 254:
                raise RuntimeError(f"pod runner: more than {254 - self.first_ip + 1} pods in {self.subnet}.0/24")
            self._addresses[pod_name] = f"{self.subnet}.{self._next_ip}"
            self._next_ip += 1
        return self._addresses[pod_name]

    def _launch(self, pod) -> None:
        ip = self._address(pod.metadata.name)
        container = pod.spec.containers[0]
        # per pod UID: a new pod with the same name (a recreated PyTorchJob replica) starts with empty
        # emptyDir and ephemeral volumes, as on a node; only PersistentVolumeClaims carry over
        workdir = self._workdir(pod)
        workdir.mkdir(parents=True, exist_ok=True)
        local = LocalPod(
            namespace=pod.metadata.namespace, name=pod.metadata.name, uid=pod.metadata.uid, ip=ip,
            log=self.log_dir / f"{pod.metadata.namespace}_{pod.metadata.name}.log",
            restart_always=pod.spec.restart_policy == "Always", argv=[], env={}, workdir=workdir,
            readiness=None, image=container.image, container=container.name,
            tmp=Path(tempfile.mkdtemp(prefix="wrpo-pod-")),
        )
        self.pods[local.name] = local
        self._link_log(local)
        try:
            self._targets = self._service_targets()
            volumes = self._volumes(pod, workdir)
            local.init = [self._step(pod, c, ip, volumes, local.tmp) for c in pod.spec.init_containers or []]
            local.main = self._step(pod, container, ip, volumes, local.tmp)
        except Exception as e:  # noqa: BLE001 - a pod we cannot start fails, like a bad image
            self._set_terminated(local, 128, "CreateContainerConfigError", str(e), container.image)
            return
        local.readiness = self._probe(container.readiness_probe, ip)
        self._next_step(local)

    def _link_log(self, local: LocalPod) -> None:
        if self.log_links is None:
            return
        self.log_links.mkdir(parents=True, exist_ok=True)
        link = self.log_links / local.log.name
        link.unlink(missing_ok=True)
        link.symlink_to(local.log)

    def _workdir(self, pod) -> Path:
        """The pod's own folder (per UID: a re-created pod of the same name starts empty)."""
        return self.log_dir / f"{pod.metadata.namespace}_{pod.metadata.name}_{pod.metadata.uid[:8]}.work"

    def _step(self, pod, container, ip: str, volumes: dict[str, Path], tmp: Path | None = None) -> Step:
        mounts = self._mounts(container, volumes)
        env = self._environment(pod, container, ip, mounts, tmp)
        log_file = self._workdir(pod) / "termination-log"  # = LocalPod.termination_log, read when it exits
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.touch()  # the kubelet's /dev/termination-log: an empty file the container may write
        env["WRPO_TERMINATION_LOG"] = str(log_file)
        return Step(container.name, self._argv(container, env, ip, mounts), env)

    def _next_step(self, local: LocalPod) -> None:
        """Start the next init container, or the main container once none is left."""
        step = local.init[0] if local.init else local.main
        local.argv, local.env = step.argv, step.env
        self._spawn(local)
        if not local.init:
            self._patch_status(local, local.image, running=True, ready=local.readiness is None)
            local.ready = local.readiness is None

    def _spawn(self, local: LocalPod) -> None:
        local.started_at = _now()
        with local.log.open("ab") as out:
            out.write(f"{STEP_MARKER} {_now()} {local.argv}\n".encode())
            out.flush()
            local.process = subprocess.Popen(
                local.argv, env=local.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=local.workdir, start_new_session=True,
            )

    def _supervise(self, local: LocalPod) -> None:
        if local.finished or local.process is None:
            return
        image = local.image
        code = local.process.poll()
        if local.init:
            self._supervise_init(local, code)
            return
        if code is None:
            if not local.ready and local.readiness and self._probe_passes(local.readiness):
                local.ready = True
                self._patch_status(local, image, running=True, ready=True)
            return
        if local.restart_always:
            local.restarts += 1
            local.ready = False
            self._patch_status(local, image, running=True, ready=False)
            time.sleep(min(2.0, 0.2 * local.restarts))
            self._spawn(local)
            local.ready = local.readiness is None
            if local.ready:
                self._patch_status(local, image, running=True, ready=True)
            return
        reason = "Completed" if code == 0 else "Error"
        written = local.termination_log.read_text() if local.termination_log.exists() else ""
        self._set_terminated(local, code, reason, written or tail(local.log, 20)[-1000:], image)

    def _supervise_init(self, local: LocalPod, code: int | None) -> None:
        """An init container that succeeded hands over to the next; a failed one fails the pod
        (restartPolicy Never) or is run again, as the kubelet does."""
        if code is None:
            return
        if code == 0:
            local.init.pop(0)
            self._next_step(local)
        elif local.restart_always or self._restart_on_failure(local):
            local.restarts += 1
            time.sleep(min(2.0, 0.2 * local.restarts))
            self._spawn(local)
        else:
            message = f"init container {local.init[0].container} failed: {tail(local.log, 20)[-1000:]}"
            self._set_terminated(local, code, "Init:Error", message, local.image)

    def _restart_on_failure(self, local: LocalPod) -> bool:
        return self._policies.get(local.name) == "OnFailure"

    def _kill(self, local: LocalPod) -> None:
        if local.process:
            stop_process(local.process, self.grace_seconds)
        local.finished = True
        local.remove_tmp()

    def _force_delete(self, pod) -> None:
        from kubernetes.client.rest import ApiException

        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                            grace_period_seconds=0)

    # -- pod spec → process ----------------------------------------------------------------

    def _environment(self, pod, container, ip: str, mounts: dict[str, Path] | None = None,
                     tmp: Path | None = None) -> dict[str, str]:
        base = {**os.environ, **(private_temp_environment(tmp) if tmp else {})}
        base["PATH"] = os.pathsep.join([*self.extra_path, base.get("PATH", "")])
        base["HOSTNAME"] = pod.metadata.name
        env: dict[str, str] = {}
        for source in container.env_from or []:
            prefix = source.prefix or ""
            ref = source.secret_ref or source.config_map_ref
            read = self._secret if source.secret_ref else self._config_map
            data = self._optional(read, pod.metadata.namespace, ref.name, ref.optional)
            env.update({prefix + k: v for k, v in (data or {}).items()})
        for var in container.env or []:
            value = self._env_value(pod, var, ip, {**base, **env})
            if value is not None:  # None: an optional reference to something missing
                env[var.name] = value
        # Only what the pod spec says is rewritten; the test's own environment stays as it is.
        local = {k: self._rewrite_mounts(self._rewrite(v, ip), mounts or {}) for k, v in env.items()}
        out = {**base, **local, **self.env_overrides}
        # the cluster-DNS stand-in, in every Python process of the pod (PYTHONPATH: the site folder first)
        out["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE_DIR), out.get("PYTHONPATH")) if p)
        out["WRPO_TEST_CLUSTER_DNS"] = str(self.dns_table)
        return out

    def _optional(self, read, namespace: str, name: str, optional: bool | None,
                  key: str | None = None) -> dict[str, str] | str | None:
        """`read(namespace, name)` (or its `key`); None when it is missing and the reference optional."""
        from kubernetes.client.rest import ApiException

        try:
            data = read(namespace, name)
        except ApiException as e:
            if e.status == 404 and optional:
                return None
            raise
        if key is None:
            return data
        if key not in data and optional:
            return None
        return data[key]

    def _env_value(self, pod, var, ip: str, env: dict[str, str]) -> str | None:
        if var.value_from is None:
            # $(VAR) references to earlier variables, as the kubelet expands them.
            return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                          lambda m: env.get(m.group(1), m.group(0)), var.value or "")
        source = var.value_from
        ns = pod.metadata.namespace
        if source.secret_key_ref:
            ref = source.secret_key_ref
            return self._optional(self._secret, ns, ref.name, ref.optional, ref.key)
        if source.config_map_key_ref:
            ref = source.config_map_key_ref
            return self._optional(self._config_map, ns, ref.name, ref.optional, ref.key)
        if source.field_ref:
            path = source.field_ref.field_path
            fields = {
                "metadata.name": pod.metadata.name, "metadata.namespace": pod.metadata.namespace,
                "metadata.uid": pod.metadata.uid, "spec.nodeName": pod.spec.node_name or "",
                "spec.serviceAccountName": pod.spec.service_account_name or "",
                "status.podIP": ip, "status.hostIP": "127.0.0.1",
            }
            match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if match:
                return (getattr(pod.metadata, match.group(1)) or {}).get(match.group(2), "")
            return fields[path]
        if source.resource_field_ref:
            return "1"
        raise ValueError(f"unsupported valueFrom for {var.name}")

    def _argv(self, container, env: dict[str, str], ip: str, mounts: dict[str, Path] | None = None) -> list[str]:
        argv = list(container.command or [])
        if not argv:
            entrypoint = next((v for k, v in self.image_entrypoints.items()
                               if container.image.startswith(k)), None)
            if entrypoint is None:
                raise ValueError(f"container {container.name} has no command and image "
                                 f"{container.image} has no entry in image_entrypoints")
            argv = list(entrypoint)
        argv += list(container.args or [])
        argv = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                       lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]
        argv = [self._rewrite_mounts(self._rewrite(a, ip), mounts or {}) for a in argv]
        head = self.command_map.get(argv[0])
        if callable(head):  # a program whose local stand-in takes other arguments
            return list(head(argv))
        if head is None and "/" not in argv[0]:
            found = shutil.which(argv[0], path=env.get("PATH"))
            head = [found] if found else None
        return [*(head or argv[:1]), *argv[1:]]

    # -- volumes -----------------------------------------------------------------------------

    def _volumes(self, pod, workdir: Path) -> dict[str, Path]:
        """Each volume of the pod as a folder: under its work folder (emptyDir, a generic ephemeral volume,
        ConfigMap, Secret), or, for a PersistentVolumeClaim, one folder per claim that outlives the pod (a
        restarted pod finds what the last one wrote)."""
        out: dict[str, Path] = {}
        ns = pod.metadata.namespace
        for vol in pod.spec.volumes or []:
            folder = workdir / "volumes" / vol.name
            if vol.persistent_volume_claim is not None:
                folder = self.log_dir / "claims" / f"{ns}_{vol.persistent_volume_claim.claim_name}"
            folder.mkdir(parents=True, exist_ok=True)
            if vol.config_map or vol.secret:
                src = vol.config_map or vol.secret
                name = src.name if vol.config_map else src.secret_name
                read = self._config_map if vol.config_map else self._secret
                data = self._optional(read, ns, name, src.optional) or {}
                items = {i.key: i.path for i in src.items or []} or {k: k for k in data}
                for key, rel in items.items():
                    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    (folder / rel).write_text(data[key])
            elif (vol.empty_dir is None and vol.projected is None and vol.ephemeral is None
                  and vol.persistent_volume_claim is None):  # projected: the service-account token
                raise ValueError(f"volume {vol.name}: only emptyDir, ephemeral, persistentVolumeClaim, "
                                 "configMap and secret volumes run locally")
            out[vol.name] = folder
        return out

    @staticmethod
    def _mounts(container, volumes: dict[str, Path]) -> dict[str, Path]:
        """A container's mountPath → local path (its volume's folder, or a file in it for subPath). A mount
        inside another one (a PVC at /work/x/scratch under an emptyDir at /work) becomes a symbolic link in
        the outer folder, so paths the process builds from the outer one reach it."""
        out = {}
        for mount in container.volume_mounts or []:
            folder = volumes[mount.name]
            out[mount.mount_path.rstrip("/") or "/"] = folder / mount.sub_path if mount.sub_path else folder
        for outer, outer_dir in out.items():
            for inner, inner_dir in out.items():
                if inner.startswith(outer.rstrip("/") + "/"):
                    link = outer_dir / inner[len(outer.rstrip("/")) + 1:]
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if not link.exists() and not link.is_symlink():
                        link.symlink_to(inner_dir, target_is_directory=True)
        return out

    @staticmethod
    def _rewrite_mounts(value: str, mounts: dict[str, Path]) -> str:
        """A mountPath where a path starts (after `=`, `:`, a space, a quote or at the start), followed
        by `/` or the end of the path → the local folder. One pass, longest first: /a/b wins over /a,
        and a local folder under a mountPath (an emptyDir at /tmp) is not rewritten again."""
        if not mounts:
            return value
        paths = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
        pattern = rf"(?<![\w.~/-])({paths})(?=/|$|[^\w.~-])"
        return re.sub(pattern, lambda m: str(mounts[m.group(1)]), value)

    def _rewrite(self, value: str, ip: str) -> str:
        """0.0.0.0 → the pod's loopback address; Service URLs and bare Service host names (a
        whole value) → local addresses."""
        value = value.replace("0.0.0.0", ip)
        if value in self._pod_hosts:  # a pod's own name (PET_MASTER_ADDR=job-node-0-0.job): its address
            return self._pod_hosts[value]
        for host, target in self._targets.items():
            svc, _, rest = host.partition(".")
            ns = rest or self.namespace
            # The short name only resolves inside the runner's own namespace.
            optional = "?" if ns == self.namespace else ""
            pattern = (rf"(?P<scheme>\w+://){re.escape(svc)}(\.{re.escape(ns)}"
                       rf"(\.svc(\.cluster\.local)?)?){optional}(?P<port>:\d+)?(?=[/\s\"',;]|$)")

            def replace(m, target=target):
                t = target if ":" in target else target + (m.group("port") or "")
                return m.group("scheme") + t

            if svc not in self._headless:  # a headless Service's URLs resolve through the DNS stand-in
                value = re.sub(pattern, replace, value)
            # A bare host name as the whole value (MASTER_ADDR=job-master-0): its address.
            bare = rf"{re.escape(svc)}(\.{re.escape(ns)}(\.svc(\.cluster\.local)?)?){optional}"
            if re.fullmatch(bare, value):
                value = target.split(":")[0]
        return value

    def _service_targets(self) -> dict[str, str]:
        """Service host → local host:port, from `host_map` and Services selecting local pods."""
        targets: dict[str, str] = {}
        try:
            services = self.core.list_namespaced_service(self.namespace).items
        except Exception:  # noqa: BLE001
            services = []
        pods = self._unfinished()
        # a host_map entry still wins
        self._headless = {svc.metadata.name for svc in services if svc.spec.cluster_ip == "None"} - set(self.host_map)
        self._pod_hosts = self._known_hosts(services, pods)
        for svc in services:
            selector = svc.spec.selector or {}
            if not selector or not svc.spec.ports:
                continue
            for name in pods:
                if self._labels_match(name, selector):
                    port = svc.spec.ports[0].target_port or svc.spec.ports[0].port
                    targets[svc.metadata.name] = f"{self._addresses[name]}:{port}"
                    break
        targets.update(self.host_map)
        return targets

    def _unfinished(self) -> list[str]:
        """Every listed pod that has not finished here, started or not (a worker may start before its master)."""
        return [name for name in self._labels if name in self._addresses
                and not (name in self.pods and self.pods[name].finished)]

    def _known_hosts(self, services, unfinished: list[str]) -> dict[str, str]:
        """The host names of every listed pod the runner addressed (`_host_names`), a pod still to finish
        (`unfinished`, from `_unfinished`) winning over a finished one of the same name (a JobSet restart
        makes a new pod with the old hostname). A finished pod's name still counts: the Indexed Job may
        create a worker only after its master has finished (a pod with nothing to rendezvous, such as an
        echo), and a kubelet would start that worker all the same; waiting for a master that is gone would
        hang it."""
        finished = [name for name in self._labels if name in self._addresses and name not in unfinished]
        return {**self._host_names(services, finished), **self._host_names(services, unfinished)}

    def _host_names(self, services, pods: list[str]) -> dict[str, str]:
        """The DNS names of `pods` that have a hostname and a subdomain naming a headless Service of the
        namespace (`<hostname>.<subdomain>`, `.<ns>`, `.<ns>.svc`, `.<ns>.svc.cluster.local`, as cluster DNS
        answers them) → their addresses. Without that Service the names do not resolve, as in a cluster."""
        headless = {svc.metadata.name for svc in services if svc.spec.cluster_ip == "None"}
        names: dict[str, str] = {}
        for pod in pods:
            hostname, subdomain = self._hostnames.get(pod, ("", ""))
            if subdomain in headless and pod in self._addresses:
                base = f"{hostname}.{subdomain}"
                for name in (base, f"{base}.{self.namespace}", f"{base}.{self.namespace}.svc",
                             f"{base}.{self.namespace}.svc.cluster.local"):
                    names[name] = self._addresses[pod]
        return names

    def _labels_match(self, pod_name: str, selector: dict[str, str]) -> bool:
        labels = self._labels.get(pod_name, {})
        return all(labels.get(k) == v for k, v in selector.items())

    def _probe(self, probe, ip: str) -> dict | None:
        if probe is None:
            return None
        if probe.http_get:
            return {"url": f"http://{ip}:{probe.http_get.port}{probe.http_get.path or '/'}"}
        if probe.tcp_socket:
            return {"tcp": (ip, int(probe.tcp_socket.port))}
        return None

    @staticmethod
    def _probe_passes(probe: dict) -> bool:
        try:
            if "url" in probe:
                with urllib.request.urlopen(probe["url"], timeout=1) as response:
                    return 200 <= response.status < 400
            with socket.create_connection(probe["tcp"], timeout=1):
                return True
        except OSError:
            return False

    # -- status ----------------------------------------------------------------------------

    def _patch_status(self, local: LocalPod, image: str, *, running: bool, ready: bool) -> None:
        now = _now()
        state = ({"running": {"startedAt": local.started_at or now}} if running
                 else {"waiting": {"reason": "ContainerCreating"}})
        flag = "True" if ready else "False"
        body = {"status": {
            "phase": "Running", "podIP": self._fake_pod_ip(local), "hostIP": "10.240.0.1",
            "startTime": local.started_at or now,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                {"type": "Ready", "status": flag, "lastTransitionTime": now},
            ],
            "containerStatuses": [{
                "name": local.container, "image": image, "imageID": "",
                "ready": ready, "started": running, "restartCount": local.restarts, "state": state,
            }],
        }}
        self.core.patch_namespaced_pod_status(local.name, local.namespace, body)

    def _set_terminated(self, local: LocalPod, code: int, reason: str, message: str, image: str) -> None:
        now = _now()
        local.finished = True
        local.remove_tmp()
        body = {"status": {
            "phase": "Succeeded" if code == 0 else "Failed",
            "podIP": self._fake_pod_ip(local), "hostIP": "10.240.0.1",
            "startTime": local.started_at or now,
            "conditions": [
                {"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
                for t in ("ContainersReady", "Ready")
            ],
            "containerStatuses": [{
                "name": local.container, "image": image, "imageID": "", "ready": False,
                "started": False, "restartCount": local.restarts,
                "state": {"terminated": {"exitCode": code, "reason": reason, "message": message,
                                         "startedAt": local.started_at or now, "finishedAt": now}},
            }],
        }}
        self.core.patch_namespaced_pod_status(local.name, local.namespace, body)

    @staticmethod
    def _fake_pod_ip(local: LocalPod) -> str:
        # Endpoints and EndpointSlices reject loopback addresses, so the API sees 10.245.0.N.
        return "10.245.0." + local.ip.rsplit(".", 1)[1]

    # -- data sources ----------------------------------------------------------------------

    def _secret(self, namespace: str, name: str) -> dict[str, str]:
        secret = self.core.read_namespaced_secret(name, namespace)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def _config_map(self, namespace: str, name: str) -> dict[str, str]:
        return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
