"""`python -m wrpo_operator [kopf run options]`, e.g. `--standalone --all-namespaces
--liveness=http://0.0.0.0:8080/healthz`: kopf's own CLI with the handlers module preloaded."""

from __future__ import annotations

import sys


def main() -> None:
    from kopf.cli import main as kopf_main

    sys.argv = ["kopf", "run", "-m", "wrpo_operator.handlers", *sys.argv[1:]]
    kopf_main()


if __name__ == "__main__":
    main()
