"""Scoring throughput of `SequenceClassifierScorer` against the reward model's raw batched forward.

Both score the same (prompt, response) pairs with the same batch size; the raw baseline gets the token
ids for free (tokenised beforehand, padded in input order), ours includes chat templating, tokenisation,
length sorting and padding. Prints one JSON line with `scoring_throughput_vs_raw_forward` (target >= 0.9);
`vs_raw_sorted_forward` compares with the raw forward over the same length-sorted batches as ours, i.e.
it measures only our overhead (templating, tokenising, bookkeeping).

    python benchmarks/scoring.py [--model DIR] [--pairs 512] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def make_pairs(n: int, seed: int = 0) -> list[tuple[list[dict[str, str]], str]]:
    """Corpus questions with answers of varied length (1-6 corpus answers glued together)."""
    from wrpo.models.tiny import corpus_pairs

    rng = random.Random(seed)
    qa = corpus_pairs()
    out = []
    for _ in range(n):
        q, _ = rng.choice(qa)
        answer = " ".join(rng.choice(qa)[1] for _ in range(rng.randint(1, 6)))
        out.append(([{"role": "user", "content": q}], answer))
    return out


def raw_forward(scorer, seqs, batch_size: int) -> float:
    """Seconds for the plain batched forward over pre-tokenised ids (input order, right padding)."""
    import torch

    from wrpo.data.scoring import pad_right

    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_right(seqs[i:i + batch_size], scorer.pad_id)
            ids, mask = ids.to(scorer.device), mask.to(scorer.device)
            scorer.model(input_ids=ids, attention_mask=mask).logits.float()
    return time.perf_counter() - t0


def ours(scorer, pairs) -> float:
    t0 = time.perf_counter()
    scorer.score(pairs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="Reward model folder (default: the tiny reward model, in a temp dir).")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from wrpo.data.scoring import SequenceClassifierScorer

    model = args.model
    if model is None:
        from wrpo.models.tiny import write_tiny_models

        root = Path(tempfile.mkdtemp(prefix="wrpo-bench-"))
        model = str(write_tiny_models(root, names=("reward",))["reward"])
    scorer = SequenceClassifierScorer(model, max_length=args.max_length, batch_size=args.batch_size)
    pairs = make_pairs(args.pairs)
    seqs = [scorer.encoder.encode(m, r) for m, r in pairs]
    raw_forward(scorer, seqs[: args.batch_size * 2], args.batch_size)  # warm-up
    raw_s = min(raw_forward(scorer, seqs, args.batch_size) for _ in range(args.repeats))
    by_length = sorted(seqs, key=len, reverse=True)
    sorted_s = min(raw_forward(scorer, by_length, args.batch_size) for _ in range(args.repeats))
    ours_s = min(ours(scorer, pairs) for _ in range(args.repeats))
    print(json.dumps({
        "benchmark": "scoring", "scoring_throughput_vs_raw_forward": round(raw_s / ours_s, 3),
        "vs_raw_sorted_forward": round(sorted_s / ours_s, 3),
        "ours_pairs_per_s": round(len(pairs) / ours_s, 1), "raw_pairs_per_s": round(len(pairs) / raw_s, 1),
        "pairs": len(pairs), "batch_size": args.batch_size,
        "mean_tokens": round(sum(map(len, seqs)) / len(seqs)),
        "device": scorer.device, "threads": torch.get_num_threads(), "model": Path(model).name,
    }))


if __name__ == "__main__":
    main()
