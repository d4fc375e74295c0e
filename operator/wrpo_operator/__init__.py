"""The WRPO operator: a thin kopf controller that runs each FusionRun's stages as Kubernetes children.

Layering (checked by tests/unit/test_operator_layering.py): this package imports `wrpo.pipeline.spec` and
`wrpo.pipeline.plan` only, never torch or transformers, so the operator image stays small. `crd`, `builders`
and `status` are pure; `kube` is the only module that talks to the apiserver; `handlers` only
registers kopf handlers that call `reconcile.reconcile`.
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
#: Server-side apply / create field manager of everything the operator writes.
FIELD_MANAGER = "wrpo-operator"

__all__ = [
    "API_VERSION", "FIELD_MANAGER", "GROUP", "KIND",
    "LABEL_COMPONENT", "LABEL_RUN",
    "LABEL_STAGE", "LABEL_STAGE_HASH", "PLURAL", "SHORT_NAMES", "SINGULAR", "VERSION",
]
