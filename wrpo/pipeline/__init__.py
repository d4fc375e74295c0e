"""The pipeline layer: the spec, the stage plan, the run directory and the stage runtime.

`spec.py` (FusionSpec), `plan.py` (the stage table, hashes, the servers of a stage), `servers.py` (a vLLM
server: its description, GPUs, command line and readiness, for local serving and the operator alike),
`gpus.py` (GPU accounting, a leaf), `context.py` (StageContext and StageOptions, a leaf), `rundir.py` (the
commit protocol: manifests, shards, checked reads), `workdir.py` (local copies and scratch), `runtime.py` (run
one stage), `runner.py` (`wrpo run`).

May import: `wrpo.errors`, `wrpo.storage`, pydantic/yaml/rich. Never torch, never `wrpo.data` or
`wrpo.engine` (stage bodies are imported by name from the plan's rows when a stage runs), never
Kubernetes code. The operator imports `spec`, `plan`, `servers` and `gpus` from here. See
docs/architecture.md.
"""
