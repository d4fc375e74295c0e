"""A dynamic volume provisioner for the harness (there is no CSI driver without a kubelet).

It plays the part of an external provisioner for the StorageClass `standard` (the cluster's default,
`volumeBindingMode: WaitForFirstConsumer`): when the scheduler has picked a node for a claim
(`volume.kubernetes.io/selected-node`), it creates a hostPath PersistentVolume for it with a `claimRef`;
the real PV controller binds the two and the scheduler binds the pod. A PV of ours that is Released
(its claim deleted; reclaim policy Delete) is deleted with its folder. So PersistentVolumeClaims, generic
ephemeral volumes (the ephemeral-volume controller makes their claims) and WaitForFirstConsumer scheduling
all behave as on a real cluster; the pod runner maps each claim to a folder (k8s_podrunner.py).

A volume's folder is made world-writable (0777), as a local-path provisioner makes it (rancher's
local-path-provisioner, kind's default, runs `mkdir -m 0777 -p`): the kubelet applies a pod's `fsGroup`
to emptyDir, ConfigMap and CSI volumes, but never to a hostPath volume, so on the real node
(k8s_node.py) a root-owned 0755 folder is one the stage pods (uid 1000) cannot write to.

Run by the harness as a component: python k8s_provisioner.py --kubeconfig K --root DIR
"""

from __future__ import annotations

import argparse
import logging
import shutil
import threading
import time
from pathlib import Path

PROVISIONER = "wrpo.test/hostpath"
STORAGE_CLASS = "standard"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
log = logging.getLogger("provisioner")


def storage_class() -> dict:
    return {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS,
                     "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": True,
    }


def _ours(pvc, classes: dict[str, str]) -> bool:
    sc = pvc.spec.storage_class_name
    return sc is not None and classes.get(sc) == PROVISIONER


#: The mode of a volume's folder: writable by any pod user (see the module's docstring).
VOLUME_MODE = 0o777


def volume_folder(root: Path, name: str) -> Path:
    """The folder of volume `name` under `root`, created (again) with VOLUME_MODE whatever the umask."""
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(VOLUME_MODE)
    return path


def provision(core, pvc, root: Path) -> None:
    meta = pvc.metadata
    name = f"pvc-{meta.uid}"
    path = volume_folder(root, name)
    pv = {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": pvc.spec.resources.requests["storage"]},
            "accessModes": pvc.spec.access_modes,
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": pvc.spec.storage_class_name,
            "volumeMode": pvc.spec.volume_mode or "Filesystem",
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta.namespace,
                         "name": meta.name, "uid": meta.uid},
            "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
        },
    }
    from kubernetes.client.rest import ApiException

    try:
        core.create_persistent_volume(pv)
        log.info("provisioned %s for %s/%s", name, meta.namespace, meta.name)
    except ApiException as e:
        if e.status != 409:
            raise


def run(kubeconfig: str, root: Path, stop: threading.Event | None = None) -> None:
    from kubernetes import client, config, watch
    from kubernetes.client.rest import ApiException

    api = config.new_client_from_config(config_file=kubeconfig)
    core, storage = client.CoreV1Api(api), client.StorageV1Api(api)
    try:
        storage.create_storage_class(storage_class())
    except ApiException as e:
        if e.status != 409:
            raise
    stop = stop or threading.Event()

    def classes() -> dict[str, str]:
        return {sc.metadata.name: sc.provisioner for sc in storage.list_storage_class().items}

    def claims() -> None:
        while not stop.is_set():
            known = classes()
            try:
                for event in watch.Watch().stream(core.list_persistent_volume_claim_for_all_namespaces,
                                                  timeout_seconds=60):
                    pvc = event["object"]
                    annotations = pvc.metadata.annotations or {}
                    if (event["type"] != "DELETED" and not pvc.spec.volume_name and SELECTED_NODE in annotations
                            and _ours(pvc, known) and pvc.metadata.deletion_timestamp is None):
                        provision(core, pvc, root)
            except Exception as e:  # noqa: BLE001 - reconnect
                log.warning("claims watch: %s", e)
                time.sleep(1)

    def volumes() -> None:
        while not stop.is_set():
            try:
                for event in watch.Watch().stream(core.list_persistent_volume, timeout_seconds=60):
                    pv = event["object"]
                    ours = (pv.metadata.annotations or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
                    if ours and event["type"] != "DELETED" and (pv.status.phase or "") in ("Released", "Failed"):
                        try:
                            core.delete_persistent_volume(pv.metadata.name)
                        except ApiException as e:
                            if e.status != 404:
                                raise
                        shutil.rmtree(root / pv.metadata.name, ignore_errors=True)
                        log.info("deleted %s", pv.metadata.name)
            except Exception as e:  # noqa: BLE001 - reconnect
                log.warning("volumes watch: %s", e)
                time.sleep(1)

    threads = [threading.Thread(target=f, daemon=True) for f in (claims, volumes)]
    for t in threads:
        t.start()
    while not stop.is_set():
        stop.wait(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--root", required=True, type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print("provisioner started", flush=True)
    run(args.kubeconfig, args.root)


if __name__ == "__main__":
    main()
