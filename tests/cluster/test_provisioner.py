"""The harness provisioner (k8s_provisioner.py) makes volumes a non-root pod can write to, as a
local-path provisioner does: on the real node (k8s_node.py) the kubelet applies no fsGroup to its
hostPath volumes, so a root-owned 0755 folder is one the stage pods (uid 1000) cannot write to.
The kubelet's side (a restricted pod writing to each kind of volume) is
test_node_e2e.py::test_a_restricted_pod_writes_to_every_kind_of_volume_the_operator_mounts."""

from __future__ import annotations

import stat
from pathlib import Path

import k8s_node
import pytest
from k8s_provisioner import SELECTED_NODE, VOLUME_MODE

pytestmark = [pytest.mark.cluster]


def test_a_claim_gets_a_world_writable_host_folder(k8s_cluster, k8s_namespace, k8s_api_client):
    """A claim of the default StorageClass, once the scheduler has picked a node (the annotation it
    sets), is bound to a hostPath PersistentVolume whose folder is mode 0777 whatever the umask."""
    from kubernetes import client

    core = client.CoreV1Api(k8s_api_client)
    node = core.list_node(label_selector="type=kwok").items[0].metadata.name
    core.create_namespaced_persistent_volume_claim(
        k8s_namespace,
        {
            "metadata": {"name": "data", "annotations": {SELECTED_NODE: node}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )

    def bound():
        claim = core.read_namespaced_persistent_volume_claim("data", k8s_namespace)
        return claim.spec.volume_name if claim.status.phase == "Bound" else None

    k8s_node.wait_for("the claim bound", bound, 180)
    pv = core.read_persistent_volume(bound())
    folder = Path(pv.spec.host_path.path)
    assert folder.is_relative_to(k8s_cluster.work_dir), folder
    assert stat.S_IMODE(folder.stat().st_mode) == VOLUME_MODE == 0o777, oct(folder.stat().st_mode)
