"""The backends a stage talks to: a chat client for a served model (given or started here by
`wrpo.data.serving.serve`), an external OpenAI-compatible endpoint, an LLM judge, and the reward scorer the
spec asks for. The data stages (`wrpo.data.stages`) and the eval stage (`wrpo.eval.stages`) both use them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from wrpo.data.serving import given_endpoint, serve
from wrpo.errors import WrpoError
from wrpo.pipeline.context import StageContext
from wrpo.pipeline.plan import servers
from wrpo.pipeline.servers import Server
from wrpo.storage import S3Options

log = logging.getLogger(__name__)


def chat_client(ctx: StageContext, base_url: str | list[str], model: str, api_key: str | None = None,
                discover: bool = False) -> Any:
    """An OpenAI-compatible client with the spec's concurrency, timeout and retries; `discover`: the replicas
    of a given server are the addresses its name resolves to (the operator's headless Service)."""
    from wrpo.data.sampling import ChatClient

    s = ctx.spec.sampling
    return ChatClient(
        base_url,
        model,
        api_key=api_key,
        concurrency=s.concurrency,
        timeout_s=s.request_timeout_s,
        max_retries=s.max_retries,
        discover=discover,
    )


@contextmanager
def chat_backend(ctx: StageContext, server: Server, model_dir: str | None = None) -> Iterator[Any]:
    """A ChatBackend for one served model: its server (given or local), or transformers generate."""
    from wrpo.data.sampling import GenerateBackend

    with serve(ctx, server, model_dir) as urls:
        if urls is not None:
            given = given_endpoint(ctx, server) is not None  # the operator's Service: its pods are the replicas
            yield chat_client(ctx, [f"{u}/v1" for u in urls], server.served_name, discover=given)
            return
        log.warning(
            "vLLM is not available (set WRPO_VLLM_PYTHON); sampling %s with transformers generate, "
            "one prompt at a time",
            server.served_name,
        )
        yield GenerateBackend(model_dir or ctx.work.model(server.model, S3Options.from_spec(ctx.spec.storage)))


def external_backend(ctx: StageContext, endpoint: Any) -> Any:
    """A ChatBackend for an external OpenAI-compatible endpoint (its key from the env or a file)."""
    from wrpo.data.sampling import resolve_api_key

    return chat_client(ctx, endpoint.url, endpoint.model, resolve_api_key(endpoint.api_key_env, endpoint.api_key_file))


def reward_servers(ctx: StageContext) -> list[Server]:
    """The server of the reward model in this stage's plan row (an eval judge that is also the reward judge
    plays both roles: one server, `Server.roles`)."""
    return [s for s in servers(ctx.spec, ctx.name, ctx.run.uri) if s.plays("reward")]


@contextmanager
def reward_scorer(ctx: StageContext) -> Iterator[Any]:
    """The scorer the spec asks for: in-process, an external pooling endpoint, or the plan's reward server."""
    from wrpo.data.scoring import ArmoRMScorer, JudgeScorer, RemoteScorer, SequenceClassifierScorer

    r, spec = ctx.spec.reward, ctx.spec
    if r.type == "judge":
        with judge_backend(ctx, r.judge, reward_servers(ctx)) as backend:
            j = r.judge
            yield JudgeScorer(
                backend,
                j.endpoint.model if j.endpoint else j.model,
                j.max_tokens,
                j.temperature,
                spec.sampling.seed,
                j.constrained,
                j.expected_grade,
            )
        return
    model = ctx.work.model(r.model, S3Options.from_spec(spec.storage)) if r.model else None
    if r.type == "remote":
        if model is None:
            raise WrpoError("reward.model is needed to tokenise for a remote reward endpoint")
        with ExitStack() as stack:
            endpoint = r.endpoint
            for server in reward_servers(ctx):  # no endpoint in the spec: serve the model
                urls = stack.enter_context(serve(ctx, server, model))
                if urls is None:
                    raise WrpoError(
                        "reward.type 'remote' without an endpoint needs vLLM to serve reward.model "
                        "(set WRPO_VLLM_PYTHON)"
                    )
                endpoint = urls[0]
            yield RemoteScorer(
                endpoint, r.served_name, model, r.max_length, r.batch_size, max_retries=spec.sampling.max_retries
            )
        return
    assert model is not None
    cls = ArmoRMScorer if r.type == "armorm" else SequenceClassifierScorer
    yield cls(model, max_length=r.max_length, batch_size=r.batch_size, name=r.model)


@contextmanager
def judge_backend(ctx: StageContext, judge: Any, served: list[Server]) -> Iterator[Any]:
    """The backend of an LLM judge (`JudgeSpec`): its external endpoint, or its model's server (`served`,
    given or started locally; transformers generate without vLLM)."""
    if judge.endpoint is not None:
        yield external_backend(ctx, judge.endpoint)
        return
    (server,) = served
    with chat_backend(ctx, server) as backend:
        yield backend
