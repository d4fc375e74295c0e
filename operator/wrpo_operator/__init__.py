"""The WRPO operator: a thin kopf controller that runs each FusionRun's stages as Kubernetes children.

Layering (checked by tests/unit/test_layering.py and tests/unit/test_operator_layering.py): this package
imports `wrpo.pipeline` (spec, plan, servers, gpus, the workdir layout) and the bottom modules only, never
torch or transformers, so the operator image stays small. `crd`, `builders`, `decide`, `window`, `status` and
`stalls` are pure; `reconcile` is the thin I/O shell around `decide.decide`; `kube` is the only module that
writes to the apiserver; `cache` holds what the watches saw; `controller` runs `reconcile.reconcile` from a
work queue; `handlers` only registers kopf handlers that feed the cache (docs/operator.md, "Reconcile").
"""

GROUP = "fusion.wrpo.io"
VERSION = "v1alpha1"
KIND = "FusionRun"
PLURAL = "fusionruns"
SINGULAR = "fusionrun"
SHORT_NAMES = ("fr",)
API_VERSION = f"{GROUP}/{VERSION}"

#: Every child carries these labels; the operator finds its children by the first one.
LABEL_RUN = f"{GROUP}/run"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_COMPONENT = f"{GROUP}/component"
#: Prefix of the stage hash a child was built from (a label value holds at most 63 characters).
LABEL_STAGE_HASH = f"{GROUP}/stage-hash"
#: Hash of what the user controls in a child's pods (builders.template_hash): a child whose label differs
#: from the one the current spec gives is replaced.
LABEL_TEMPLATE_HASH = f"{GROUP}/template-hash"
#: The FusionRun's UID, on every child and its pods: children are matched by owner UID, pods by this label.
LABEL_RUN_UID = f"{GROUP}/run-uid"
#: Hash of the spec in an (immutable) spec ConfigMap.
LABEL_SPEC_HASH = f"{GROUP}/spec-hash"
#: Kueue's label naming the LocalQueue of a Job, PyTorchJob or pod (cluster.queueName).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: Server-side apply / create field manager of everything the operator writes.
FIELD_MANAGER = "wrpo-operator"

__all__ = [
    "API_VERSION", "FIELD_MANAGER", "GROUP", "KIND",
    "LABEL_COMPONENT", "LABEL_RUN", "LABEL_RUN_UID", "LABEL_SPEC_HASH",
    "LABEL_STAGE", "LABEL_STAGE_HASH", "LABEL_TEMPLATE_HASH", "PLURAL", "QUEUE_LABEL", "SHORT_NAMES",
    "SINGULAR", "VERSION",
]
