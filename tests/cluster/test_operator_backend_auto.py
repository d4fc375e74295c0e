"""`cluster.training.backend: auto` against a real apiserver whose CRDs each test chooses (docs/operator.md,
"Training backends"): a bare control plane of this module's own (etcd + kube-apiserver, no controllers), so
that the training-operator's and Trainer's CRDs can be installed and removed without touching the session's
cluster. The operator's real `reconcile` runs against it with the admin's `Kube`: discovery, the dry run of
every child (the TrainJob and TrainingRuntime against Trainer v2's CRD schemas), and the first stage's
creation."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from pathlib import Path

import k8s_harness
import pytest
import yaml

from wrpo_operator import GROUP, PLURAL, VERSION
from wrpo_operator.admission import ask_server
from wrpo_operator.kube import Kube
from wrpo_operator.reconcile import reconcile

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
#: The CRD directories of each training backend (the harness's builds: tests/cluster/build-*.sh).
BACKEND_CRDS = {"pytorchjob": "training-operator-crds", "trainjob": "trainer-crds"}


def _spec(backend: str = "auto") -> dict:
    spec = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())["spec"]
    spec["cluster"]["training"]["backend"] = backend
    return spec


@pytest.fixture(scope="module")
def bare(k8s_bin_dir):
    """(cluster, {backend: [CRD documents]}) of a control plane without controllers; the FusionRun CRD is
    installed, the training CRDs by `serve`."""
    try:
        controllers = k8s_harness.find_controllers(("trainer",))
    except k8s_harness.ControllersMissing as e:
        pytest.skip(str(e))
    work = Path(tempfile.mkdtemp(prefix="wrpo-bare-"))
    cluster = k8s_harness.Cluster(bin_dir=k8s_bin_dir, work_dir=work)
    try:
        k8s_harness._start_etcd_and_apiserver(cluster, 120)
        crds = {b: [yaml.safe_load(p.read_text()) for p in sorted(d.glob("*.yaml"))]
                for b, d in (("pytorchjob", k8s_bin_dir / BACKEND_CRDS["pytorchjob"]),
                             ("trainjob", controllers / BACKEND_CRDS["trainjob"]))}
        fusionrun = yaml.safe_load((ROOT / "manifests" / "crd" / "fusionruns.fusion.wrpo.io.yaml").read_text())
        _apply_crds(cluster, [fusionrun])
        yield cluster, crds
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def _apply_crds(cluster, docs: list[dict]) -> None:
    from kubernetes import client

    with contextlib.closing(cluster.api_client()) as api:
        ext = client.ApiextensionsV1Api(api)
        for doc in docs:
            with contextlib.suppress(client.ApiException):
                ext.create_custom_resource_definition(doc)

        def established():
            for doc in docs:
                crd = ext.read_custom_resource_definition(doc["metadata"]["name"])
                if not any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
                    return False
            return True

        k8s_harness.wait_for("CRDs Established", established, 60)


def serve(bare, backends: set[str]) -> Kube:
    """Make the apiserver serve exactly `backends` (install or remove their CRDs; wait until discovery says so);
    returns the admin's Kube."""
    from kubernetes import client

    cluster, crds = bare
    api = cluster.api_client()
    ext = client.ApiextensionsV1Api(api)
    names = {b: [d["metadata"]["name"] for d in crds[b]] for b in crds}

    def gone(name: str) -> bool:
        try:
            ext.read_custom_resource_definition(name)
        except client.ApiException as e:
            return e.status == 404
        return False

    for b in set(crds) - backends:
        for name in names[b]:
            with contextlib.suppress(client.ApiException):
                ext.delete_custom_resource_definition(name)
    # a CRD deleted by an earlier test may still be terminating: gone before it is created again
    for name in [n for b in crds for n in names[b]]:
        k8s_harness.wait_for(f"CRD {name} deleted", lambda n=name: not _terminating(ext, n), 60)
    _apply_crds(cluster, [d for b in backends for d in crds[b]])
    for b in set(crds) - backends:
        for name in names[b]:
            k8s_harness.wait_for(f"CRD {name} deleted", lambda n=name: gone(n), 60)
    kube = Kube(api)
    kinds = {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}
    k8s_harness.wait_for(f"discovery serving {sorted(backends)}",
                         lambda: {b for b, k in kinds.items() if kube.served(k)} == backends, 60)
    return kube


def _terminating(ext, name: str) -> bool:
    from kubernetes import client

    try:
        return ext.read_custom_resource_definition(name).metadata.deletion_timestamp is not None
    except client.ApiException:
        return False


def _run(kube: Kube, spec: dict) -> dict:
    """A FusionRun in a fresh namespace, reconciled once; its status."""
    from kubernetes import client

    ns = f"auto-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube.api_client).create_namespace({"metadata": {"name": ns}})
    custom = client.CustomObjectsApi(kube.api_client)
    run = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FusionRun", "metadata": {"name": "auto"}, "spec": spec})
    d = reconcile(run, _observed(), kube)
    got = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "auto")["status"]
    assert got["phase"] == d.status["phase"]
    return got


def _observed():
    from wrpo_operator.decide import Observed

    return Observed()


@pytest.mark.parametrize("backends,picked", [
    ({"pytorchjob"}, "pytorchjob"), ({"trainjob"}, "trainjob"), ({"pytorchjob", "trainjob"}, "trainjob"),
])
def test_auto_picks_the_backend_the_apiserver_serves(bare, backends, picked):
    kube = serve(bare, backends)
    status = _run(kube, _spec())
    # admitted: every child of the run, its TrainJobs and TrainingRuntimes (or PyTorchJobs) included, passed a
    # server-side dry run against the installed CRDs' schemas
    assert status["phase"] == "Running" and status.get("admittedHash"), status
    served = {b for b, k in (("pytorchjob", "PyTorchJob"), ("trainjob", "TrainJob")) if kube.served(k)}
    assert status["training"] == {"backend": picked}, served


@pytest.mark.parametrize("backend,backends", [("trainjob", {"pytorchjob"}), ("pytorchjob", {"trainjob"}),
                                              ("auto", set())])
def test_a_backend_not_served_is_refused_at_admission_naming_the_field(bare, backend, backends):
    kube = serve(bare, backends)
    status = _run(kube, _spec(backend))
    assert status["phase"] == "Failed" and status["message"].startswith("cluster.training.backend: "), status
    assert {c["type"]: c["status"] for c in status["conditions"]}["SpecInvalid"] == "True"
    # `wrpo spec validate --cluster --server` says the same from outside the cluster
    from wrpo.pipeline.spec import parse_spec

    lines = ask_server(kube.api_client, "auto", "default", parse_spec(_spec(backend)))
    assert len(lines) == 1 and lines[0].startswith("cluster.training.backend: "), lines
