"""The pod runner without a cluster: address and mountPath rewriting, volumes, optional references,
init containers (real processes, a fake API)."""

from __future__ import annotations

import base64
import ipaddress
import time
from pathlib import Path

import pytest
from k8s_podrunner import LocalPod, PodRunner
from kubernetes.client.rest import ApiException


@pytest.fixture
def runner(tmp_path):
    from kubernetes import client

    r = PodRunner(client.ApiClient(), "ns1", tmp_path)
    r._targets = {"model": "127.0.0.12:8000", "judge.other": "127.0.0.1:9000", "s3": "127.0.0.1"}
    return r


@pytest.mark.parametrize(("value", "expected"), [
    ("http://model/v1", "http://127.0.0.12:8000/v1"),
    ("http://model:80/v1", "http://127.0.0.12:8000/v1"),
    ("http://model.ns1.svc.cluster.local:80", "http://127.0.0.12:8000"),
    ("http://model.ns1.svc:80/v1/completions", "http://127.0.0.12:8000/v1/completions"),
    ("http://model.elsewhere:80/v1", "http://model.elsewhere:80/v1"),  # another namespace's
    ("http://models:80", "http://models:80"),  # another name
    ("http://judge.other.svc.cluster.local:8080/x", "http://127.0.0.1:9000/x"),
    ("http://judge:8080", "http://judge:8080"),  # judge is mapped in namespace other only
    ("http://s3:8333", "http://127.0.0.1:8333"),  # host-only target keeps the port
    ("--host=0.0.0.0", "--host=127.0.0.7"),
    ("model", "127.0.0.12"),  # MASTER_ADDR-style bare host names
    ("model.ns1.svc.cluster.local", "127.0.0.12"),
    ("model-x", "model-x"),
    ("a model", "a model"),
    ("a=http://model:80,b=http://s3:1", "a=http://127.0.0.12:8000,b=http://127.0.0.1:1"),
])
def test_rewrite(runner, value, expected):
    assert runner._rewrite(value, "127.0.0.7") == expected


def test_a_headless_services_urls_stay_for_the_dns_stand_in(runner):
    runner._headless = {"model"}  # its name resolves to every Ready pod (podrunner_site/sitecustomize.py)
    assert runner._rewrite("http://model.ns1.svc:8000/v1", "127.0.0.7") == "http://model.ns1.svc:8000/v1"
    assert runner._rewrite("model", "127.0.0.7") == "127.0.0.12"  # a bare host name (MASTER_ADDR) still is


def test_pod_addresses_are_loopback_in_the_runners_own_subnet(runner):
    """One address per pod, all in the runner's 127.A.B.0/24 (random per runner, so that another test
    session's pods on the machine do not collide on 127.0.0.N:8000), and a clear error past .254."""
    a, b = runner._address("a"), runner._address("b")
    assert a != b and runner._address("a") == a
    assert {a.rsplit(".", 1)[0], b.rsplit(".", 1)[0]} == {runner.subnet} and runner.subnet.startswith("127.")
    assert all(ipaddress.ip_address(x).is_loopback for x in (a, b))
    for i in range(254 - runner.first_ip - 1):
        runner._address(f"p{i}")
    with pytest.raises(RuntimeError, match="more than 245 pods"):
        runner._address("one-too-many")


# -- volumes, optional references and init containers (a fake API, real processes) -----------------

class FakeCore:
    """Secrets, ConfigMaps and the pod-status patches the runner sends; nothing else."""

    def __init__(self, secrets=None, config_maps=None):
        self.secrets, self.config_maps = secrets or {}, config_maps or {}
        self.statuses: list[dict] = []

    @staticmethod
    def _read(store, name):
        from kubernetes.client.rest import ApiException

        if name not in store:
            raise ApiException(status=404, reason="Not Found")
        return store[name]

    def read_namespaced_secret(self, name, namespace):
        from kubernetes import client

        data = {k: base64.b64encode(v.encode()).decode() for k, v in self._read(self.secrets, name).items()}
        return client.V1Secret(data=data)

    def read_namespaced_config_map(self, name, namespace):
        from kubernetes import client

        return client.V1ConfigMap(data=self._read(self.config_maps, name))

    def list_namespaced_service(self, namespace):
        from kubernetes import client

        return client.V1ServiceList(items=[])

    def patch_namespaced_pod_status(self, name, namespace, body):
        self.statuses.append(body["status"])


def make_pod(containers, init=(), volumes=(), restart="Never"):
    from kubernetes import client

    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="p", namespace="ns1", uid="u1"),
        spec=client.V1PodSpec(containers=list(containers), init_containers=list(init) or None,
                              volumes=list(volumes) or None, restart_policy=restart, node_name="n"),
        status=client.V1PodStatus(phase="Pending"))


@pytest.fixture
def fake(runner):
    runner.core = FakeCore(secrets={"s3": {"KEY": "k1"}},
                           config_maps={"spec": {"spec.yaml": "a: 1\n", "other": "x"}})
    return runner.core


@pytest.mark.parametrize(("value", "expected"), [
    ("/etc/wrpo/spec.yaml", "L/spec/spec.yaml"),
    ("--spec=/etc/wrpo/spec.yaml", "--spec=L/spec/spec.yaml"),
    ("/etc/wrpo", "L/spec"),
    ("/etc/wrpo2/x", "/etc/wrpo2/x"),  # another folder
    ("/weights/model", "L/weights/model"),
    ("/weights/a/model", "L/wa/model"),  # the longer mountPath wins
    ("s3://bucket/weights/model", "s3://bucket/weights/model"),  # not where a path starts
    ("a:/weights/x,b=/etc/wrpo", "a:L/weights/x,b=L/spec"),
    ("/tmp/x", "/tmp/pods/p/volumes/t/x"),  # replaced once, though the result starts with /tmp
])
def test_mount_paths_become_local_folders(value, expected):
    mounts = {"/etc/wrpo": Path("L/spec"), "/weights": Path("L/weights"), "/weights/a": Path("L/wa"),
              "/tmp": Path("/tmp/pods/p/volumes/t")}
    assert PodRunner._rewrite_mounts(value, mounts) == expected


def test_configmap_and_emptydir_volumes_are_materialised_and_mount_paths_rewritten(runner, fake, tmp_path):
    from kubernetes import client

    volumes = [client.V1Volume(name="spec", config_map=client.V1ConfigMapVolumeSource(name="spec")),
               client.V1Volume(name="one", config_map=client.V1ConfigMapVolumeSource(
                   name="spec", items=[client.V1KeyToPath(key="other", path="sub/o.txt")])),
               client.V1Volume(name="work", empty_dir=client.V1EmptyDirVolumeSource())]
    mounts = [client.V1VolumeMount(name="spec", mount_path="/etc/wrpo"),
              client.V1VolumeMount(name="one", mount_path="/etc/one.txt", sub_path="sub/o.txt"),
              client.V1VolumeMount(name="work", mount_path="/work")]
    c = client.V1Container(name="c", image="i", command=["cat", "/etc/wrpo/spec.yaml"],
                           env=[client.V1EnvVar(name="OUT", value="/work/out")], volume_mounts=mounts)
    pod = make_pod([c], volumes=volumes)
    local = runner._volumes(pod, tmp_path)
    step = runner._step(pod, c, "127.0.0.7", local)
    assert step.argv[1:] == [str(tmp_path / "volumes" / "spec" / "spec.yaml")]
    assert Path(step.argv[1]).read_text() == "a: 1\n"
    assert (tmp_path / "volumes" / "one" / "sub" / "o.txt").read_text() == "x"
    assert not (tmp_path / "volumes" / "one" / "spec.yaml").exists()  # only the listed items
    assert step.env["OUT"] == str(tmp_path / "volumes" / "work" / "out")


def test_unsupported_volumes_are_refused(runner, fake, tmp_path):
    from kubernetes import client

    host = client.V1Volume(name="m", host_path=client.V1HostPathVolumeSource(path="/models"))
    with pytest.raises(ValueError, match="only emptyDir, ephemeral, persistentVolumeClaim"):
        runner._volumes(make_pod([], volumes=[host]), tmp_path)


def test_a_claim_is_one_folder_that_outlives_the_pod_and_nested_mounts_link_into_it(runner, fake, tmp_path):
    from kubernetes import client

    pvc = client.V1Volume(name="ck", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
        claim_name="run-checkpoints"))
    scratch = client.V1Volume(name="scratch", ephemeral=client.V1EphemeralVolumeSource())
    first = runner._volumes(make_pod([], volumes=[pvc, scratch]), tmp_path / "a")
    again = runner._volumes(make_pod([], volumes=[pvc, scratch]), tmp_path / "b")
    assert first["ck"] == again["ck"] and first["scratch"] != again["scratch"]  # a claim outlives a pod
    c = client.V1Container(name="c", image="i", volume_mounts=[
        client.V1VolumeMount(name="scratch", mount_path="/work"),
        client.V1VolumeMount(name="ck", mount_path="/work/run/scratch")])
    mounts = runner._mounts(c, first)
    (first["ck"] / "checkpoint-1").mkdir()
    assert (mounts["/work"] / "run" / "scratch" / "checkpoint-1").is_dir()  # through the link


def test_optional_secret_references_to_missing_things_stay_unset(runner, fake):
    from kubernetes import client

    def ref(name, key, optional):
        sel = client.V1SecretKeySelector(name=name, key=key, optional=optional)
        return client.V1EnvVar(name=f"{name}_{key}", value_from=client.V1EnvVarSource(secret_key_ref=sel))

    c = client.V1Container(name="c", image="i", env=[ref("s3", "KEY", None), ref("s3", "TOKEN", True),
                                                      ref("gone", "KEY", True)],
                           env_from=[client.V1EnvFromSource(
                               secret_ref=client.V1SecretEnvSource(name="gone", optional=True))])
    env = runner._environment(make_pod([c]), c, "127.0.0.7")
    assert env["s3_KEY"] == "k1" and "s3_TOKEN" not in env and "gone_KEY" not in env
    c.env = [ref("s3", "TOKEN", False)]
    with pytest.raises(KeyError):
        runner._environment(make_pod([c]), c, "127.0.0.7")
    c.env = [ref("gone", "KEY", None)]
    with pytest.raises(ApiException):
        runner._environment(make_pod([c]), c, "127.0.0.7")


def _run_pod(runner, pod, timeout=300.0):  # a hang detector: the shell commands take milliseconds
    runner._launch(pod)
    local = runner.pods[pod.metadata.name]
    deadline = time.monotonic() + timeout
    while not local.finished and time.monotonic() < deadline:
        runner._supervise(local)
        time.sleep(0.05)
    assert local.finished, f"pod {pod.metadata.name} not finished after {timeout}s: {runner.logs(pod.metadata.name)}"
    return local


def test_init_containers_run_in_order_before_the_main_container(runner, fake):
    from kubernetes import client

    work = client.V1Volume(name="w", empty_dir=client.V1EmptyDirVolumeSource())
    mount = [client.V1VolumeMount(name="w", mount_path="/w")]

    def sh(name, script):
        return client.V1Container(name=name, image="i", command=["sh", "-c", script], volume_mounts=mount)

    pod = make_pod([sh("main", "cat /w/log")], init=[sh("one", "echo one >> /w/log"),
                                                      sh("two", "echo two >> /w/log")],
                   volumes=[work])
    local = _run_pod(runner, pod)
    final = fake.statuses[-1]
    assert final["phase"] == "Succeeded", runner.logs("p")
    assert runner.logs("p").splitlines()[-2:] == ["one", "two"]  # main printed what both wrote
    # Running is reported only once the main container started
    assert [s["phase"] for s in fake.statuses] == ["Running", "Succeeded"]
    assert local.container == "main"


def test_each_pod_has_its_own_temporary_folder_removed_when_it_ends(runner, fake):
    """As a container has its own /tmp: what a pod's processes leave in $TMPDIR (vLLM's sockets) goes with it."""
    from kubernetes import client

    def pod(name, script):
        p = make_pod([client.V1Container(name="c", image="i", command=["sh", "-c", script])])
        p.metadata.name, p.metadata.uid = name, f"uid-{name}"
        return p

    script = 'echo "$TMPDIR $VLLM_RPC_BASE_PATH"; touch "$TMPDIR/left-behind"; test -f "$TMPDIR/left-behind"'
    one, two = _run_pod(runner, pod("one", script)), _run_pod(runner, pod("two", script))
    assert [s["phase"] for s in fake.statuses] == ["Running", "Succeeded"] * 2, runner.logs("one")
    folders = [runner.logs(name).splitlines()[-1].split() for name in ("one", "two")]
    assert folders[0][0] != folders[1][0] and all(tmp == rpc for tmp, rpc in folders)
    assert not any(Path(tmp).exists() for tmp, _ in folders) and one.tmp is None and two.tmp is None


def test_a_command_map_entry_may_rewrite_the_whole_command(runner, fake):
    from kubernetes import client

    runner.command_map["serve"] = lambda argv: ["echo", "served", *argv[1:]]
    c = client.V1Container(name="c", image="i", command=["serve"], args=["--host", "0.0.0.0"])
    assert runner._argv(c, {}, "127.0.0.7") == ["echo", "served", "--host", "127.0.0.7"]


def test_a_failed_init_container_fails_the_pod_and_the_main_one_never_runs(runner, fake):
    from kubernetes import client

    init = client.V1Container(name="fetch", image="i", command=["sh", "-c", "exit 3"])
    main = client.V1Container(name="main", image="i", command=["sh", "-c", "echo main-ran"])
    _run_pod(runner, make_pod([main], init=[init]))
    final = fake.statuses[-1]
    assert final["phase"] == "Failed" and "main-ran" not in runner.logs("p")
    term = final["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Init:Error" and "fetch" in term["message"]


def test_the_dns_stand_in_answers_headless_service_names(tmp_path):
    """A pod's Python process (the runner puts podrunner_site first on PYTHONPATH): a name in the table resolves
    to its addresses, one with none is not known, every other name resolves as before."""
    import json
    import os
    import subprocess
    import sys

    table = tmp_path / "cluster-dns.json"
    table.write_text(json.dumps({"svc.ns1.svc": ["127.0.0.12", "127.0.0.13"], "gone": []}))
    probe = ("import socket\n"
             "print(sorted({i[4][0] for i in socket.getaddrinfo('svc.ns1.svc.', 8000)}))\n"
             "print({i[4][0] for i in socket.getaddrinfo('127.0.0.1', 80)})\n"
             "try:\n    socket.getaddrinfo('gone', 80)\nexcept socket.gaierror:\n    print('not known')\n")
    site = Path(__file__).resolve().parent / "podrunner_site"
    env = {**os.environ, "PYTHONPATH": str(site), "WRPO_TEST_CLUSTER_DNS": str(table)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["['127.0.0.12', '127.0.0.13']", "{'127.0.0.1'}", "not known"]


class FakeJobSet(FakeCore):
    """The pods and headless Service of a 2-node Trainer v2 JobSet `job` (the runner lists them), no process."""

    def __init__(self):
        super().__init__()
        self.pod_list, self.services = [], []

    def list_namespaced_pod(self, namespace, label_selector=""):
        from kubernetes import client

        return client.V1PodList(items=list(self.pod_list))

    def list_namespaced_service(self, namespace):
        from kubernetes import client

        return client.V1ServiceList(items=list(self.services))

    def add_pod(self, index: int):
        """The Indexed Job's pod `index`: name `job-node-0-<index>-<random>`, hostname without the random part,
        the JobSet's subdomain, and PET_MASTER_ADDR as Trainer's torch plugin sets it. Not bound to a Node,
        so the runner lists it and starts nothing."""
        from kubernetes import client

        env = [client.V1EnvVar(name="PET_MASTER_ADDR", value="job-node-0-0.job")]
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name=f"job-node-0-{index}-x{index}", namespace="ns1", uid=f"u{index}"),
            spec=client.V1PodSpec(containers=[client.V1Container(name="node", image="i", env=env)],
                                  hostname=f"job-node-0-{index}", subdomain="job", restart_policy="Never"),
            status=client.V1PodStatus(phase="Pending"))
        self.pod_list.append(pod)
        return pod

    def add_service(self):
        from kubernetes import client

        self.services.append(client.V1Service(
            metadata=client.V1ObjectMeta(name="job", namespace="ns1"),
            spec=client.V1ServiceSpec(cluster_ip="None", selector={}, publish_not_ready_addresses=True)))


def test_a_jobset_pods_host_name_resolves_to_its_address_once_its_headless_service_exists(runner):
    """Trainer v2 names the first pod in PET_MASTER_ADDR as `<hostname>.<subdomain>`. torchrun's rendezvous store
    resolves it in C++, past the DNS stand-in, so the runner rewrites the whole value to the pod's address; a pod
    waits until the pod it names is listed and the JobSet's headless Service exists, as cluster DNS answers it
    only then; the DNS table (Python clients) has every form of the name."""
    import json

    runner.core = fake = FakeJobSet()
    worker = fake.add_pod(1)  # the Job controller may create the worker first
    runner._tick()
    assert runner._awaits_master(worker)
    master = fake.add_pod(0)
    runner._tick()
    assert runner._awaits_master(worker) and runner._awaits_master(master)  # no Service yet: no name
    fake.add_service()
    runner._tick()
    assert not runner._awaits_master(worker) and not runner._awaits_master(master)
    runner._service_targets()  # as each launch does
    address = runner._addresses["job-node-0-0-x0"]
    for name in ("job-node-0-0.job", "job-node-0-0.job.ns1.svc.cluster.local"):
        assert runner._rewrite(name, "127.0.0.7") == address
    assert runner._rewrite("job-node-0-0.job.other", "127.0.0.7") == "job-node-0-0.job.other"  # elsewhere
    assert runner._rewrite("job-node-0-0", "127.0.0.7") == "job-node-0-0"  # a bare hostname does not resolve
    runner.pods["job-node-0-0-x0"] = LocalPod("ns1", "job-node-0-0-x0", "u0", address, runner.log_dir / "l",
                                              False, [], {}, runner.log_dir, None)  # launched, not Ready
    runner._publish_dns()  # publishNotReadyAddresses: the names resolve before the pod is Ready
    table = json.loads(runner.dns_table.read_text())
    assert table["job-node-0-0.job"] == table["job-node-0-0.job.ns1.svc"] == [address]
    assert "job-node-0-1.job" not in table  # not launched here


def test_a_worker_listed_after_its_master_finished_starts_and_gets_its_address(runner):
    """An Indexed Job may create the worker only after the master has run and finished (a pod with nothing to
    rendezvous: the echo TrainJob of test_harness_controllers.py, on a loaded machine); a kubelet would start
    the worker all the same, so the runner must not wait for a master that is gone. A new pod with the
    master's hostname (a JobSet restart) wins over the finished one."""
    runner.core = fake = FakeJobSet()
    fake.add_service()
    fake.add_pod(0)
    runner._tick()
    first = runner._addresses["job-node-0-0-x0"]
    runner.pods["job-node-0-0-x0"] = LocalPod("ns1", "job-node-0-0-x0", "u0", first, runner.log_dir / "l0", False,
                                              [], {}, runner.log_dir, None, finished=True)  # ran and exited
    worker = fake.add_pod(1)
    runner._tick()
    assert not runner._awaits_master(worker)
    runner._service_targets()
    assert runner._rewrite("job-node-0-0.job", "127.0.0.7") == first
    # the restarted group: the old master is gone from the listing, a new one with its hostname is not finished
    fake.pod_list[:] = [p for p in fake.pod_list if p.metadata.name != "job-node-0-0-x0"]
    again = fake.add_pod(0)
    again.metadata.name, again.metadata.uid = "job-node-0-0-y0", "v0"
    runner._tick()
    runner._service_targets()
    assert runner._rewrite("job-node-0-0.job", "127.0.0.7") == runner._addresses["job-node-0-0-y0"] != first
