"""A vLLM server a stage needs: its description, its GPUs, its command line and its readiness
(docs/architecture.md, "The plan").

One `Server` is served two ways from this one module: locally as a subprocess on 127.0.0.1
(`wrpo.data.serving.VLLMServer`) and on a cluster as a Deployment + Service
(`wrpo_operator.builders.build_vllm_deployment`). Both take the server's options from `vllm_options` and
its readiness from `HEALTH_PATH`, so the two cannot drift apart. Pure and torch-free (the operator imports
it); it imports only `wrpo.pipeline.gpus`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Literal

from wrpo.pipeline.gpus import server_gpus

#: The path vLLM answers 200 on once the model is loaded: the local wait and the pods' probes poll it.
HEALTH_PATH = "/health"


@dataclass(frozen=True)
class Server:
    """A vLLM server a stage needs: the operator makes it a Deployment + Service, the local runtime a
    subprocess (`wrpo.data.serving.VLLMServer`)."""

    key: str  # src-<source>, target, reward, judge or eval-<role>: the child-name suffix
    served_name: str
    model: str  # folder, s3:// URI or hub id
    runner: Literal["generate", "pooling"] = "generate"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = 0.9  # None: vLLM's default
    args: tuple[str, ...] = ()  # extra `vllm serve` arguments from the spec
    source: str | None = None  # the --endpoint key it answers under (a source, an eval role, judge)
    replicas: int = 1  # data-parallel copies behind one Service (each with tensor_parallel_size GPUs)
    seed: int | None = None  # vLLM's engine seed (`sampling.seed`): the same on a laptop and on a cluster
    aliases: tuple[str, ...] = ()  # further served names (a server that plays two roles answers to both)
    roles: tuple[str, ...] = ()  # further keys it serves under (e.g. "reward" for an eval judge that is
    #                              also the reward model: one server, see `wrpo.pipeline.plan.servers`)

    def gpus(self, vllm_gpus: int | None) -> int:
        """GPUs held with all replicas (`vllm_gpus`: `cluster.vllm.gpus`)."""
        return server_gpus(self.tensor_parallel_size, self.replicas, vllm_gpus)

    def plays(self, key: str) -> bool:
        """Whether it serves the role `key` (its own key, or one of the roles merged into it)."""
        return key == self.key or key in self.roles

    def identity(self) -> tuple[object, ...]:
        """What makes two servers the same process: everything but the names they answer to."""
        names = {"key", "served_name", "source", "aliases", "roles"}
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in names)


def servers_gpus(servers: Iterable[Server], vllm_gpus: int | None) -> int:
    """GPUs held by these servers with all their replicas (`vllm_gpus`: `cluster.vllm.gpus`)."""
    return sum(s.gpus(vllm_gpus) for s in servers)


def vllm_options(server: Server, host: str, port: int, gpu: bool) -> list[str]:
    """The `vllm serve` options of `server` (everything after the model path), local and on a cluster.

    On CPU (`gpu` False): float32, eager mode and, for generation, no chunked prefill — vLLM 0.32's CPU
    runner crashes ("CPU Generator does not use offset") when a seeded request's prefill is chunked under
    load. On a GPU: the memory share. The spec's own `vllmArgs` come last, so they win."""
    out = [
        "--served-model-name",
        server.served_name,
        *server.aliases,
        "--host",
        host,
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(server.tensor_parallel_size),
    ]
    if server.runner != "generate":
        out += ["--runner", server.runner]
    if server.seed is not None:
        out += ["--seed", str(server.seed)]
    if not gpu:
        out += ["--dtype", "float32", "--enforce-eager"]
        if server.runner == "generate":
            out += ["--no-enable-chunked-prefill"]
    elif server.gpu_memory_utilization is not None:
        out += ["--gpu-memory-utilization", str(server.gpu_memory_utilization)]
    if server.max_model_len:
        out += ["--max-model-len", str(server.max_model_len)]
    return [*out, *server.args]
