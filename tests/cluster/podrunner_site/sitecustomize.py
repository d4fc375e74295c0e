"""The PodRunner's stand-in for cluster DNS (tests/cluster/k8s_podrunner.py), imported by every Python
process it starts as a pod (this folder comes first on their PYTHONPATH).

On a cluster, CoreDNS answers the name of a headless Service with the addresses of its Ready pods. The
harness has no pod network and no DNS for the runner's pods (they are local processes on 127.A.B.N), so
the runner writes that answer, as its pods' addresses, into the JSON file `$WRPO_TEST_CLUSTER_DNS` names
({host name: [addresses]}), and this wraps `socket.getaddrinfo` to read it: a name in the file resolves to
its addresses (none: "not known"), every other name as before. A MOCK of what cannot run here; the real-node
harness (tests/cluster/k8s_node.py) runs CoreDNS itself.
"""

from __future__ import annotations

import json
import os
import socket

_TABLE = os.environ.get("WRPO_TEST_CLUSTER_DNS")
_real_getaddrinfo = socket.getaddrinfo


def _addresses(host: object) -> list[str] | None:
    name = host.decode() if isinstance(host, bytes) else host
    if not isinstance(name, str) or not _TABLE:
        return None
    try:
        with open(_TABLE) as f:
            table = json.load(f)
    except (OSError, ValueError):
        return None
    return table.get(name.rstrip("."))


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002 - socket's own names
    addresses = _addresses(host)
    if addresses is None:
        return _real_getaddrinfo(host, port, family, type, proto, flags)
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return [
        info
        for a in addresses
        for info in _real_getaddrinfo(a, port, family, type, proto, flags | socket.AI_NUMERICHOST)
    ]


if _TABLE:
    socket.getaddrinfo = getaddrinfo
