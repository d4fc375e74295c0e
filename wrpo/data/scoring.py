"""Reward scoring: a scorer maps (prompt messages, response) pairs to floats, with optional per-objective
detail. Backends:

- `SequenceClassifierScorer`: an in-process Hugging Face sequence-classification model: the pair is
  rendered with the reward model's own chat template, cut to `max_length`, batched by length (sorted,
  right padding), bf16 on GPU, float32 on CPU; the score is logit 0.
- `ArmoRMScorer`: ArmoRM-Llama3-8B-v0.1 (custom code, trust_remote_code): its output has `.score` (the
  gated preference score) and `.rewards` (19 objectives). Its custom head finds the last token as the one
  before the first pad token, so padding must be on the right with a pad id that never occurs in text.
- `RemoteScorer`: a vLLM server started with `--runner pooling`; we send the same token ids we would use
  in-process to `/pooling` with `use_activation: false`, so the scores are the raw logits.
- `JudgeScorer` (`reward.type: judge`): the 1-10 grade of an LLM judge (`wrpo.data.judge`, MT-Bench style).
  An answer whose verdict cannot be parsed scores 0, below every graded answer (so it is never chosen over
  one), and is counted; the raw verdicts are kept for the stage to store (docs/eval.md).

`score_samples` scores whole sample records and stops on a NaN/inf score with the prompt_id named;
`score_stream` does the same for records as they stream in (docs/data.md, "Scale").
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from wrpo.errors import WrpoError
from wrpo.records import PromptRecord, SampleRecord, ScoreRecord

ARMORM_OBJECTIVES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
    "code-explanation", "code-instruction-following", "code-readability",
)


class ScoringError(WrpoError):
    """Scoring failed (e.g. a non-finite score); the message names the prompt."""


@dataclass(frozen=True)
class Score:
    """One reward: the scalar used for selection, and optional per-objective values."""

    value: float
    detail: dict[str, float] | None = None


Messages = list[dict[str, str]]


class Scorer(Protocol):
    """Scores (prompt messages, response) pairs; `name` is recorded as the reward model."""

    name: str

    def score(self, pairs: Sequence[tuple[Messages, str]]) -> list[Score]: ...


# ---------------------------------------------------------------------------------------------- tokenising


class PairEncoder:
    """Renders a (prompt, response) pair with the reward model's chat template and tokenises it."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def encode(self, messages: Messages, response: str) -> list[int]:
        """Token ids of the whole conversation; over-long ones keep their beginning (the prompt)."""
        convo = [*messages, {"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(convo, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[: self.max_length]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) tensors, right-padded with `pad_id`.   # (B, T), (B, T)"""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids, mask


def _device_dtype(device: str | None) -> tuple[str, Any]:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, (torch.bfloat16 if device.startswith("cuda") else torch.float32)


# ---------------------------------------------------------------------------------------------- in-process


class SequenceClassifierScorer:
    """An in-process `AutoModelForSequenceClassification` reward model (score = logit 0)."""

    def __init__(self, model_dir: str, max_length: int = 4096, batch_size: int = 8, device: str | None = None,
                 trust_remote_code: bool = False, name: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = name or model_dir
        self.device, dtype = _device_dtype(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.encoder = PairEncoder(self.tokenizer, max_length)
        self.batch_size = batch_size
        self.pad_id = self._pad_id()

    def _pad_id(self) -> int:
        """The model's pad id (set on its config too, which HF's last-token pooling reads)."""
        pad = self.model.config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
                else self.tokenizer.eos_token_id
            self.model.config.pad_token_id = pad
        return int(pad)

    def forward(self, ids: Any, mask: Any) -> list[Score]:
        """One batch through the model.   ids, mask: (B, T)

        For the usual `<base model> + .score` heads we pool the last token by the attention mask (as
        vLLM does), so the result does not depend on the pad id occurring in the text (pad == eos)."""
        import torch

        head = getattr(self.model, "score", None)
        if isinstance(head, torch.nn.Module):
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
            last = mask.sum(-1) - 1  # (B,)
            logits = head(hidden[torch.arange(len(ids), device=hidden.device), last]).float()  # (B, labels)
        else:
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()  # (B, labels)
        return [Score(float(row[0])) for row in logits]

    def score(self, pairs: Sequence[tuple[Messages, str]]) -> list[Score]:
        return self.score_ids([self.encoder.encode(m, r) for m, r in pairs])

    def score_ids(self, seqs: Sequence[Sequence[int]]) -> list[Score]:
        """Scores of pre-tokenised sequences, in input order (batched by length internally)."""
        import torch

        out: list[Score | None] = [None] * len(seqs)
        with torch.inference_mode():
            for batch in length_batches([len(s) for s in seqs], self.batch_size):
                ids, mask = pad_right([seqs[i] for i in batch], self.pad_id)
                for i, s in zip(batch, self.forward(ids.to(self.device), mask.to(self.device)), strict=True):
                    out[i] = s
        return out  # type: ignore[return-value]


class ArmoRMScorer(SequenceClassifierScorer):
    """ArmoRM (custom code): score = `output.score`, detail = the objectives of `output.rewards`.

    Its head takes the token before the first pad as the last one, so the pad id must not be a token the
    template emits (Llama-3's eos <|eot_id|> is): we use the config's dedicated pad id."""

    def __init__(self, model_dir: str, max_length: int = 4096, batch_size: int = 8, device: str | None = None,
                 name: str | None = None):
        super().__init__(model_dir, max_length, batch_size, device, trust_remote_code=True, name=name)

    def _pad_id(self) -> int:
        pad = self.model.config.pad_token_id
        if pad is None or pad in (self.tokenizer.eos_token_id, self.tokenizer.bos_token_id):
            raise ScoringError(f"{self.name}: ArmoRM needs a dedicated pad token id in its config "
                               f"(got {pad}); right padding with eos would pool the wrong token")
        return int(pad)

    def forward(self, ids: Any, mask: Any) -> list[Score]:
        output = self.model(input_ids=ids, attention_mask=mask)
        scores = output.score.float().reshape(len(ids), -1)[:, 0]  # (B,)
        rewards = getattr(output, "rewards", None)
        names = ARMORM_OBJECTIVES
        out = []
        for row, value in enumerate(scores.tolist()):
            detail = None
            if rewards is not None:
                values = rewards[row].float().tolist()
                keys = names if len(values) == len(names) else [f"objective_{k}" for k in range(len(values))]
                detail = dict(zip(keys, values, strict=True))
            out.append(Score(value, detail))
        return out


# ---------------------------------------------------------------------------------------------- remote


class RemoteScorer:
    """A vLLM `--runner pooling` server: token ids in, raw logits out (`use_activation: false`).

    The tokenizer is the reward model's (loaded from `tokenizer_dir`), so the ids match in-process scoring."""

    def __init__(self, root_url: str, served_name: str, tokenizer_dir: str, max_length: int = 4096,
                 batch_size: int = 8, concurrency: int = 4, timeout_s: float = 600.0, max_retries: int = 8,
                 api_key: str | None = None):
        from transformers import AutoTokenizer

        from wrpo.data.sampling import ChatClient

        self.name = served_name
        self.encoder = PairEncoder(AutoTokenizer.from_pretrained(tokenizer_dir), max_length)
        self.batch_size, self.served_name = batch_size, served_name
        root = root_url.rstrip("/").removesuffix("/v1")
        self._client = lambda: ChatClient(root, served_name, api_key, concurrency, timeout_s, max_retries,
                                          path="/pooling")

    def score(self, pairs: Sequence[tuple[Messages, str]]) -> list[Score]:
        return self.score_ids([self.encoder.encode(m, r) for m, r in pairs])

    def score_ids(self, seqs: Sequence[Sequence[int]]) -> list[Score]:
        return asyncio.run(self._score_ids(seqs))

    async def _score_ids(self, seqs: Sequence[Sequence[int]]) -> list[Score]:
        batches = length_batches([len(s) for s in seqs], self.batch_size)
        out: list[Score | None] = [None] * len(seqs)
        async with self._client() as client:

            async def run(batch: list[int]) -> None:
                body = {"model": self.served_name, "input": [list(seqs[i]) for i in batch],
                        "use_activation": False}
                data = (await client.post(body))["data"]
                for item in data:
                    value = item["data"]
                    while isinstance(value, list):
                        value = value[0]
                    out[batch[item["index"]]] = Score(float(value))

            async with asyncio.TaskGroup() as group:
                for batch in batches:
                    group.create_task(run(batch))
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- LLM judge


UNPARSED_GRADE = 0.0  # below the judge's 1-10 scale: an ungradable answer ranks last


class JudgeScorer:
    """Reward = the LLM judge's single-answer grade (1-10); an unparsed verdict scores `UNPARSED_GRADE`.

    `backend` is a ChatClient (or any ChatBackend); `verdicts` keeps every raw verdict in scoring order."""

    def __init__(self, backend: Any, name: str, max_tokens: int = 512, temperature: float = 0.0, seed: int = 42,
                 constrained: bool = False, expected_grade: bool = False):
        self.name = name
        self.backend = backend
        self.options = dict(max_tokens=max_tokens, temperature=temperature, seed=seed, constrained=constrained,
                            expected_grade=expected_grade)
        self.verdicts: list[dict[str, Any]] = []
        self.unparsed = 0

    def score(self, pairs: Sequence[tuple[Messages, str]]) -> list[Score]:
        return asyncio.run(self._score(pairs))

    async def _score(self, pairs: Sequence[tuple[Messages, str]]) -> list[Score]:
        from wrpo.data.judge import Dialogue, Judge

        async with self.backend:
            judge = Judge(self.backend, **self.options)
            verdicts = await asyncio.gather(*(judge.grade(Dialogue(m, (), (r,))) for m, r in pairs))
        out = []
        for v in verdicts:
            self.verdicts.append(v.to_json())
            if v.value is None:
                self.unparsed += 1
            out.append(Score(UNPARSED_GRADE if v.value is None else float(v.value)))
        return out


# ---------------------------------------------------------------------------------------------- records


def score_samples(scorer: Scorer, samples: Sequence[SampleRecord], prompts: Mapping[str, PromptRecord],
                  chunk: int = 1024, progress: Callable[[int], Any] | None = None) -> list[ScoreRecord]:
    """ScoreRecords aligned with the samples' responses; non-finite scores stop with the prompt named."""
    missing = [s.prompt_id for s in samples if s.prompt_id not in prompts]
    if missing:
        raise ScoringError(f"{len(missing)} sampled prompt(s) not among the prepared prompts, "
                           f"e.g. '{missing[0]}'")
    return list(score_stream(scorer, ((s, prompts[s.prompt_id]) for s in samples), chunk, progress))


def score_stream(scorer: Scorer, items: Iterable[tuple[SampleRecord, PromptRecord | None]], chunk: int = 1024,
                 progress: Callable[[int], Any] | None = None) -> Iterator[ScoreRecord]:
    """ScoreRecords of (sample, its prompt) pairs as they stream in, in the samples' order; only about
    `chunk` answers are held at a time (docs/data.md, "Scale").

    Answers are sent to the scorer in chunks of `chunk` over the flattened stream - the same chunks,
    whatever the records' boundaries, as scoring the whole list at once - which it batches by length.
    A prompt of None (not prepared) or a non-finite score stops with the prompt named."""
    waiting: deque[list[Any]] = deque()  # [sample, values, answers not scored yet], in order
    pending: list[tuple[list[Any], int, Messages, str]] = []

    def score(part: list[tuple[list[Any], int, Messages, str]]) -> None:
        for (entry, j, _, _), sc in zip(part, scorer.score([(m, r) for _, _, m, r in part]), strict=True):
            if not math.isfinite(sc.value):
                raise ScoringError(f"reward model '{scorer.name}' gave {sc.value} for prompt "
                                   f"'{entry[0].prompt_id}' (model '{entry[0].model}', response {j})")
            entry[1][j] = sc.value
            entry[2] -= 1
        if progress:
            progress(len(part))

    def ready() -> Iterator[ScoreRecord]:
        while waiting and waiting[0][2] == 0:
            sample, values, _ = waiting.popleft()
            yield ScoreRecord(prompt_id=sample.prompt_id, model=sample.model, scores=values,
                              reward_model=scorer.name)

    for sample, prompt in items:
        if prompt is None:
            raise ScoringError(f"sampled prompt '{sample.prompt_id}' (model '{sample.model}') is not among "
                               "the prepared prompts, or not in their order")
        entry = [sample, [math.nan] * len(sample.responses), len(sample.responses)]
        waiting.append(entry)
        messages = [m.model_dump() for m in prompt.prompt]
        pending.extend((entry, j, messages, text) for j, text in enumerate(sample.responses))
        while len(pending) >= chunk:
            score(pending[:chunk])
            del pending[:chunk]
        yield from ready()
    if pending:
        score(pending)
    yield from ready()

