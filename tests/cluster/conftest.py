"""Fixtures for tests against a real control plane (see docs/cluster-harness.md).

Session scope: `k8s_cluster` (a running `k8s_harness.Cluster`), `k8s_kubeconfig` (admin kubeconfig
path), `k8s_api_client` (admin `kubernetes.client.ApiClient`), `helm`.
Function scope: `k8s_namespace` (a fresh namespace, deleted afterwards), `local_namespace` (the
same, named "local-*" so that kwok leaves its pods to a PodRunner), `restricted_namespace` and
`restricted_local_namespace` (the same with the `restricted` Pod Security Standard enforced),
`helm_install`, `service_account` (identity of a ServiceAccount, RBAC enforced), `pod_runner`.
Session scope also: `kubectl` (the harness's kubectl, built with the control plane), `fusionrun_crd` (this
checkout's FusionRun CRD, installed once).
Session scope, only when asked: `k8s_controllers` (JobSet, Trainer v2 and Kueue; tests/cluster/build-controllers.sh).

Without the binaries these tests skip, or fail when WRPO_REQUIRE_CLUSTER=1, WRPO_REQUIRE_ALL=1 or CI=true
(tests/binaries.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

import binaries
import k8s_harness
import pytest
from k8s_podrunner import PodRunner


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: needs the real Kubernetes control plane (tests/cluster/build-binaries.sh)"
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.when == "call":
        cluster = item.session.stash.get(_CLUSTER_KEY, None)
        if cluster is not None:
            report.sections.append(("control-plane logs (tails)", cluster.log_tails()))
        if "pod_runner" in item.funcargs:
            for runner in _RUNNERS:
                report.sections.append(("pod runner logs (tails)", runner.log_tails()))
    return report


_CLUSTER_KEY = pytest.StashKey[k8s_harness.Cluster]()
_RUNNERS: list[PodRunner] = []


@pytest.fixture(scope="session")
def k8s_bin_dir() -> Path:
    try:
        return k8s_harness.find_binaries()
    except k8s_harness.BinariesMissing as e:
        binaries.missing(str(e), "WRPO_REQUIRE_CLUSTER")


@pytest.fixture(scope="session")
def k8s_cluster(request, k8s_bin_dir) -> k8s_harness.Cluster:
    """The running control plane. Work dir (certs, kubeconfigs, logs) is kept when a test fails
    or WRPO_KEEP_CLUSTER_DIR=1; its path is printed at the end."""
    work_dir = Path(tempfile.mkdtemp(prefix="wrpo-k8s-"))
    failed_before = request.session.testsfailed
    try:
        cluster = k8s_harness.start_cluster(work_dir, k8s_bin_dir)
    except Exception:
        print(f"\ncontrol plane failed to start; logs in {work_dir / 'logs'}")
        raise
    request.session.stash[_CLUSTER_KEY] = cluster
    try:
        yield cluster
    finally:
        cluster.stop()
        keep = os.environ.get("WRPO_KEEP_CLUSTER_DIR") == "1"
        if keep or request.session.testsfailed > failed_before:
            print(f"\ncontrol-plane work dir kept: {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def k8s_kubeconfig(k8s_cluster) -> Path:
    return k8s_cluster.kubeconfig


@pytest.fixture(scope="session")
def k8s_api_client(k8s_cluster):
    api = k8s_cluster.api_client()
    yield api
    api.close()


def _namespace(api_client, prefix: str, labels: dict[str, str] | None = None):
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    k8s_harness.wait_for(f"ServiceAccount {name}/default",
                         lambda: core.read_namespaced_service_account("default", name), 120)
    yield name
    with contextlib.suppress(Exception):
        core.delete_namespace(name)


@pytest.fixture
def k8s_namespace(k8s_api_client):
    """A fresh namespace whose pods kwok drives (Stages in kwok/stages.yaml)."""
    yield from _namespace(k8s_api_client, "t-")


@pytest.fixture
def local_namespace(k8s_api_client):
    """A fresh namespace named local-*: kwok leaves its pods alone, for a PodRunner."""
    yield from _namespace(k8s_api_client, k8s_harness.LOCAL_NAMESPACE_PREFIX)


@pytest.fixture
def restricted_namespace(k8s_api_client):
    """A fresh kwok namespace where the Pod Security admission enforces the `restricted` standard."""
    yield from _namespace(k8s_api_client, "t-", k8s_harness.RESTRICTED_LABELS)


@pytest.fixture
def restricted_local_namespace(k8s_api_client):
    """local_namespace, with the `restricted` standard enforced."""
    yield from _namespace(k8s_api_client, k8s_harness.LOCAL_NAMESPACE_PREFIX, k8s_harness.RESTRICTED_LABELS)


@pytest.fixture(scope="session")
def kubectl(k8s_cluster):
    """kubectl(*args, kubeconfig=None, check=True, stdin=None) -> CompletedProcess: the harness's kubectl;
    the test skips without it (fails with WRPO_REQUIRE_CLUSTER=1)."""
    if not (k8s_cluster.bin_dir / "kubectl").is_file():
        binaries.missing(f"kubectl missing in {k8s_cluster.bin_dir}: run tests/cluster/build-binaries.sh",
                         "WRPO_REQUIRE_CLUSTER")
    return k8s_cluster.kubectl


@pytest.fixture(scope="session")
def helm(k8s_cluster) -> k8s_harness.Helm:
    return k8s_harness.Helm(k8s_cluster)


@pytest.fixture
def helm_install(helm):
    """helm_install(chart_path, release, namespace, values=None, wait=False) -> HelmRelease;
    every release is uninstalled afterwards."""
    releases: list[tuple[str, str]] = []

    def install(chart, release: str, namespace: str, **kwargs) -> k8s_harness.HelmRelease:
        result = helm.install(release, Path(chart), namespace, **kwargs)
        releases.append((release, namespace))
        return result

    yield install
    for release, namespace in reversed(releases):
        with contextlib.suppress(Exception):
            helm.uninstall(release, namespace)


@pytest.fixture
def service_account(k8s_cluster):
    """service_account(namespace, name, create=True) -> ServiceAccountIdentity, whose
    `api_client()`, `kubeconfig` and `env()` act as system:serviceaccount:<ns>:<name>."""
    def identity(namespace: str, name: str, **kwargs) -> k8s_harness.ServiceAccountIdentity:
        return k8s_harness.service_account_identity(k8s_cluster, namespace, name, **kwargs)

    return identity


@pytest.fixture
def pod_runner(k8s_cluster, tmp_path):
    """pod_runner(namespace, label_selector="", env_overrides=None, host_map=None, **kw) ->
    a started PodRunner (see k8s_podrunner); stopped, with its processes killed, afterwards."""
    started: list[PodRunner] = []
    clients = []

    def start(namespace: str, label_selector: str = "", **kwargs) -> PodRunner:
        api = k8s_cluster.api_client()
        clients.append(api)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        runner = PodRunner(api, namespace, tmp_path / f"pods-{len(started)}",
                           label_selector=label_selector, log_links=k8s_cluster.pod_log_dir, **kwargs)
        started.append(runner)
        _RUNNERS.append(runner)
        return runner.start()

    yield start
    for runner in started:
        runner.stop()
        _RUNNERS.remove(runner)
    for api in clients:
        api.close()


@pytest.fixture(scope="session")
def real_node(k8s_cluster, tmp_path_factory):
    """A real kubelet node beside the kwok nodes (k8s_node.py) with the images of images/build.sh
    imported. Runs only when asked (WRPO_NODE_E2E=1, set by scripts/test-images.sh): skips otherwise,
    and fails instead of skipping when WRPO_REQUIRE_NODE=1. The host is restored afterwards; a
    teardown that could not restore something fails the session's last test."""
    import k8s_node

    required = os.environ.get("WRPO_REQUIRE_NODE") == "1"
    if not (required or os.environ.get("WRPO_NODE_E2E") == "1"):
        pytest.skip("the real-node tests run with WRPO_NODE_E2E=1 (scripts/test-images.sh)")
    root = Path(__file__).resolve().parents[2]
    archive = k8s_node.image_archive(root)
    missing = k8s_node.missing_prerequisites(k8s_cluster.bin_dir)
    if not archive.is_file():
        missing.append(f"{archive} (bash images/build.sh)")
    else:
        names = k8s_node.image_names(root)
        tags = k8s_node.archive_tags(archive)
        missing += [f"{names[t]} in {archive}" for t in ("operator", "runtime-cpu", "vllm-cpu") if names[t] not in tags]
    if missing:
        binaries.missing(f"the real node needs: {', '.join(missing)}", "WRPO_REQUIRE_NODE")
    cache = Path(os.environ.get("WRPO_CACHE", Path.home() / ".cache" / "wrpo"))
    node = k8s_node.start_node(k8s_cluster, tmp_path_factory.mktemp("node"), cache / "node" / "containerd",
                               [archive])
    print(f"\nreal node {node.name} ready: {node.timings}")
    yield node
    problems = node.stop()
    assert not problems, f"the host was not fully restored: {problems}"


# -- the operator ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fusionrun_crd(k8s_api_client) -> dict:
    """This checkout's FusionRun CRD (`wrpo_operator.crd.build_crd`, the chart's crds/ file), created once per
    session or replacing an older one, Established and served. The chart's `helm install` keeps an existing CRD
    (helm skips crds/ then) and no test deletes it, so one session-wide install serves every test."""
    from kubernetes import client

    from wrpo_operator import GROUP, PLURAL, VERSION
    from wrpo_operator.crd import CRD_NAME, build_crd
    from wrpo_operator.kube import ApiError, Kube

    kube, crd = Kube(k8s_api_client), build_crd()
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    try:
        # Raw POST: the typed client's model round trip loses `maximum` next to `exclusiveMaximum: true`.
        kube.request("create", "CustomResourceDefinition", "POST", path, body=crd)
    except ApiError as e:
        if e.status != 409:  # 409: installed already (a chart install of an earlier test)
            raise
        have = kube.request("get", "CustomResourceDefinition", "GET", f"{path}/{CRD_NAME}")
        if have["spec"] != crd["spec"]:
            crd["metadata"]["resourceVersion"] = have["metadata"]["resourceVersion"]
            kube.request("replace", "CustomResourceDefinition", "PUT", f"{path}/{CRD_NAME}", body=crd)
    ext = client.ApiextensionsV1Api(k8s_api_client)

    def established() -> bool:
        got = ext.read_custom_resource_definition(CRD_NAME)
        return any(c.type == "Established" and c.status == "True" for c in got.status.conditions or [])

    def served() -> bool:  # Established precedes the discovery document a client's create goes through
        resources = client.CustomObjectsApi(k8s_api_client).get_api_resources(GROUP, VERSION).resources
        return PLURAL in {r.name for r in resources}

    k8s_harness.wait_for(f"CRD {CRD_NAME} Established", established, 120)  # hang detectors: ~1 s when idle
    k8s_harness.wait_for(f"{PLURAL}.{GROUP}/{VERSION} served", served, 120)
    return crd


@pytest.fixture
def apis(k8s_api_client):
    """(CustomObjectsApi, BatchV1Api, AppsV1Api, CoreV1Api) as the admin."""
    from kubernetes import client

    return (client.CustomObjectsApi(k8s_api_client), client.BatchV1Api(k8s_api_client),
            client.AppsV1Api(k8s_api_client), client.CoreV1Api(k8s_api_client))


@pytest.fixture
def run_namespace(restricted_namespace):
    """Where the operator tests' runs live: the Pod Security admission enforces `restricted` (every pod the
    operator makes must pass it, and so must the chart's)."""
    return restricted_namespace


@pytest.fixture
def releaser(apis, run_namespace):
    """An operator_harness.Releaser of the test's namespace, started by the test (after its fault), stopped
    afterwards."""
    from operator_harness import Releaser

    thread = Releaser(apis[3], run_namespace)
    yield thread
    thread.stop.set()
    if thread.is_alive():
        thread.join()


@pytest.fixture
def operator(run_namespace, helm_install, service_account, tmp_path):
    """The chart installed in namespace scope, and the operator running as its ServiceAccount
    (operator_harness.Operator)."""
    from operator_harness import CHART, RELEASE, Operator

    helm_install(CHART, RELEASE, run_namespace, wait=True,
                 values={"scope": "namespace", "metrics": {"enabled": False}})
    identity = service_account(run_namespace, RELEASE, create=False)
    op = Operator(identity, run_namespace, tmp_path / "operator.log").start()
    yield op
    op.kill(signal.SIGTERM)
    print(f"\noperator log: {op.log}")


# -- optional controllers (tests/cluster/build-controllers.sh) ----------------------------------------

@pytest.fixture(scope="session")
def k8s_controllers(request) -> k8s_harness.Controllers:
    """JobSet, Kubeflow Trainer v2 and Kueue (with the ClusterQueue `k8s_harness.KUEUE_CLUSTER_QUEUE`) running
    on the session's cluster, started by the first test that asks and stopped with the cluster. Skips without
    the controllers' build, fails instead with WRPO_REQUIRE_CONTROLLERS=1 or in CI (tests/binaries.py)."""
    try:
        bin_dir = k8s_harness.find_controllers()
    except k8s_harness.ControllersMissing as e:
        binaries.missing(str(e), "WRPO_REQUIRE_CONTROLLERS")
    cluster = request.getfixturevalue("k8s_cluster")
    return k8s_harness.start_controllers(cluster, bin_dir=bin_dir)


@pytest.fixture
def kueue_namespace(k8s_controllers, k8s_api_client):
    """A fresh kwok namespace that Kueue manages (label `k8s_harness.KUEUE_NAMESPACE_LABEL`) with the LocalQueue
    `k8s_harness.KUEUE_LOCAL_QUEUE` feeding the harness's 8-GPU ClusterQueue."""
    for name in _namespace(k8s_api_client, "t-", dict([k8s_harness.KUEUE_NAMESPACE_LABEL])):
        k8s_controllers.local_queue(name)
        yield name
