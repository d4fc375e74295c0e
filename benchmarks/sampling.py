"""Sampling throughput of our client (`sample_group`: bounded concurrency, retries, shard commits) against
a plain maximal-concurrency load (every request in flight at once, bare httpx) on the same real vLLM
server, with identical request bodies (same prompts, n, seeds, max_tokens). Prints one JSON line with
`sampling_throughput_vs_max_load` (target >= 0.95).

    python benchmarks/sampling.py [--model DIR] [--prompts 64] [--n 4] [--max-tokens 32] [--concurrency 64]

Needs vLLM (WRPO_VLLM_PYTHON or `vllm` importable); the tiny source-qwen model is written if no --model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path


def prompts(n: int):
    from wrpo.models.tiny import corpus_pairs
    from wrpo.records import PromptRecord

    qa = corpus_pairs()
    return [PromptRecord(prompt_id=f"b{i}", prompt=[{"role": "user", "content": qa[i % len(qa)][0]}])
            for i in range(n)]


def bodies(ps, params, model: str) -> list[dict]:
    from wrpo.data.sampling import prompt_seed

    return [{"model": model, "messages": [m.model_dump() for m in p.prompt], "n": params.n,
             "temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
             "seed": prompt_seed(params.seed, p.prompt_id)} for p in ps]


async def max_load(url: str, reqs: list[dict]) -> float:
    """Every request at once over one unbounded httpx client; seconds until all are answered."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        resps = await asyncio.gather(*(client.post(f"{url}/chat/completions", json=b) for b in reqs))
        elapsed = time.perf_counter() - t0
    bad = [r for r in resps if r.status_code != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(resps)} requests failed, e.g. HTTP {bad[0].status_code}: "
                           f"{bad[0].text[:300]}")
    return elapsed


async def ours(url: str, model: str, ps, params, concurrency: int) -> float:
    from wrpo.data.sampling import ChatClient, sample_group
    from wrpo.pipeline.rundir import RunDir

    out = RunDir(tempfile.mkdtemp(prefix="wrpo-bench-run-")).stage("sample-sources").writer()
    async with ChatClient(url, model, concurrency=concurrency) as client:
        t0 = time.perf_counter()
        await sample_group(client, ps, params, out, model, shard_size=max(1, len(ps) // 4), progress=False)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="Causal LM folder (default: the tiny source-qwen model).")
    ap.add_argument("--url", help="Use an already-running server (…/v1) instead of starting one.")
    ap.add_argument("--served-name", default="bench")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from wrpo.data.sampling import SamplingParams
    from wrpo.data.serving import VLLMServer

    params = SamplingParams(n=args.n, max_tokens=args.max_tokens)
    ps = prompts(args.prompts)
    reqs = bodies(ps, params, args.served_name)
    model = args.model
    if model is None and args.url is None:
        from wrpo.models.tiny import write_tiny_models

        root = Path(tempfile.mkdtemp(prefix="wrpo-bench-"))
        model = str(write_tiny_models(root, names=("source-qwen",))["source-qwen"])
    server = None if args.url else VLLMServer(model, args.served_name, max_model_len=1024).start()
    url = args.url or server.base_url
    try:
        asyncio.run(max_load(url, reqs[:8]))  # warm-up
        base_s, ours_s = [], []
        for _ in range(args.repeats):  # interleaved, best of each
            base_s.append(asyncio.run(max_load(url, reqs)))
            ours_s.append(asyncio.run(ours(url, args.served_name, ps, params, args.concurrency)))
    finally:
        if server:
            server.stop()
    b, o = min(base_s), min(ours_s)
    print(json.dumps({
        "benchmark": "sampling", "sampling_throughput_vs_max_load": round(b / o, 3),
        "ours_prompts_per_s": round(len(ps) / o, 2), "max_load_prompts_per_s": round(len(ps) / b, 2),
        "prompts": len(ps), "n": args.n, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
        "runs_s": {"max_load": [round(x, 2) for x in base_s], "ours": [round(x, 2) for x in ours_s]},
    }))


if __name__ == "__main__":
    main()
