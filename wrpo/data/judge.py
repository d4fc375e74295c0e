"""An LLM judge in the MT-Bench style over any OpenAI-compatible server (docs/eval.md, "The LLM judge").

Two kinds of verdict, each from a template in `wrpo/data/judge_templates/` (a system message, a line
`=== user ===`, then the user message with `$placeholders`):

- single-answer grading (`single.txt`): an integer grade 1-10 written as `[[N]]`;
- pairwise comparison (`pairwise.txt`): `[[A]]`, `[[B]]` or `[[C]]` (tie). `Judge.compare_both` asks twice
  with the answers in both orders, so position bias cancels: the orders agreeing give a win, loss or tie;
  disagreeing orders are `inconsistent` and count as a tie.

Parsing is strict: a verdict counts only when the text holds exactly one distinct verdict in the format
asked for; anything else (no verdict, two different ones, a grade outside 1-10, an empty answer) is
`None` and is counted as unparsed by the callers, never guessed. Every raw verdict text is returned so
callers can store it. With `constrained=True` the request carries a vLLM structured-outputs regex that
forces the format (for small local judges). With `expected_grade=True` a grade is the probability-weighted
mean over the grade token's alternatives (the server's `top_logprobs`, as in G-Eval) instead of the digit
written: finer-grained, so a small judge's grades tie less often; without logprobs in the reply the
written grade stands.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from wrpo.errors import WrpoError

log = logging.getLogger(__name__)
TEMPLATE_DIR = Path(__file__).parent / "judge_templates"
USER_MARK = "=== user ==="

PairVerdict = Literal["A", "B", "C"]
Outcome = Literal["win", "loss", "tie", "inconsistent", "unparsed"]
#: Points of an outcome for the model judged (None: left out of the win rate and counted).
OUTCOME_POINTS: dict[str, float | None] = {"win": 1.0, "tie": 0.5, "inconsistent": 0.5, "loss": 0.0,
                                           "unparsed": None}

_PAIR = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_GRADE = re.compile(r"\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]")


class JudgeError(WrpoError):
    """A judge template is missing or malformed."""


# ---------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user: string.Template

    def messages(self, **values: str) -> list[dict[str, str]]:
        try:
            user = self.user.substitute(values)
        except (KeyError, ValueError) as e:
            raise JudgeError(f"judge template '{self.name}': bad placeholder ({e})") from None
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


@cache
def load_template(name: str, folder: str | None = None) -> Template:
    """The template `<folder>/<name>.txt` (default folder: the built-in templates)."""
    path = Path(folder or TEMPLATE_DIR) / f"{name}.txt"
    try:
        text = path.read_text()
    except OSError as e:
        raise JudgeError(f"{path}: cannot read judge template ({e.strerror})") from None
    system, sep, user = text.partition(f"\n{USER_MARK}\n")
    if not sep:
        raise JudgeError(f"{path}: a judge template needs a line '{USER_MARK}' between system and user message")
    return Template(name, system.strip(), string.Template(user.strip()))


# ---------------------------------------------------------------------------------------------- parsing


def parse_pairwise(text: str | None) -> PairVerdict | None:
    """`A`, `B` or `C` when the text holds exactly one distinct `[[A]]`/`[[B]]`/`[[C]]`, else None."""
    found = set(_PAIR.findall(text or ""))
    return found.pop() if len(found) == 1 else None  # type: ignore[return-value]


def parse_grade(text: str | None) -> float | None:
    """The grade when the text holds exactly one distinct `[[N]]` with 1 <= N <= 10, else None."""
    found = {float(v) for v in _GRADE.findall(text or "")}
    if len(found) != 1:
        return None
    value = found.pop()
    return value if 1.0 <= value <= 10.0 else None


def expected_grade(content: list[dict[str, Any]] | None) -> float | None:
    """The probability-weighted grade at the grade token of an OpenAI `logprobs.content` list: the first
    token after `[[` that is a whole number 1-10, its `top_logprobs` alternatives that are whole numbers
    1-10 renormalised. None when there is no such token."""
    text = ""
    for tok in content or []:
        piece = tok.get("token", "")
        if text.rstrip().endswith("[[") and piece.strip().isdigit() and 1 <= int(piece.strip()) <= 10:
            weights: dict[int, float] = {}
            for alt in tok.get("top_logprobs") or [tok]:
                value = alt.get("token", "").strip()
                if value.isdigit() and 1 <= int(value) <= 10 and alt.get("logprob", -1e9) > -1e4:
                    weights[int(value)] = weights.get(int(value), 0.0) + math.exp(alt["logprob"])
            total = sum(weights.values())
            return sum(v * w for v, w in weights.items()) / total if total > 0 else None
        text += piece
    return None


def combine(first: PairVerdict | None, second: PairVerdict | None) -> Outcome:
    """The outcome for the model shown as A in the first order and as B in the second."""
    if first is None or second is None:
        return "unparsed"
    one = {"A": "win", "B": "loss", "C": "tie"}[first]
    two = {"B": "win", "A": "loss", "C": "tie"}[second]
    return one if one == two else "inconsistent"  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- dialogues


@dataclass(frozen=True)
class Dialogue:
    """A conversation as the judge sees it: the prompt's messages (ending with a user message), the later
    user turns, and one answer per turn (`len(answers) == 1 + len(followups)`)."""

    context: Sequence[dict[str, str]]
    followups: Sequence[str] = ()
    answers: Sequence[str] = ()

    def turn(self, k: int) -> Dialogue:
        """The dialogue up to and including the answer to turn k (0-based)."""
        return Dialogue(self.context, self.followups[:k], self.answers[:k + 1])


_ROLE = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_context(messages: Sequence[dict[str, str]]) -> str:
    return "\n\n".join(f"[{_ROLE.get(m['role'], m['role'])}]\n{m['content']}" for m in messages)


def render_turns(d: Dialogue, name: str) -> str:
    """The answers of one assistant with the later user turns between them (one turn: just the answer)."""
    parts = [d.answers[0]]
    for question, answer in zip(d.followups, d.answers[1:], strict=False):
        parts.append(f"[User]\n{question}\n\n[{name}]\n{answer}")
    return "\n\n".join(parts)


def single_values(d: Dialogue) -> dict[str, str]:
    """Placeholders of the single-answer template: everything before the last answer, and that answer."""
    messages = list(d.context)
    for question, answer in zip(d.followups, d.answers[:-1], strict=False):
        messages[len(messages):] = [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    return {"conversation": render_context(messages), "answer": d.answers[-1]}


def pairwise_values(a: Dialogue, b: Dialogue) -> dict[str, str]:
    return {"conversation": render_context(a.context), "answer_a": render_turns(a, "Assistant A"),
            "answer_b": render_turns(b, "Assistant B")}


# ---------------------------------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class Verdict:
    """One judge call: the raw text (stored as is), its parsed value (None: unparsed) and the finish reason."""

    raw: str
    value: Any
    finish_reason: str | None = None
    error: str | None = None  # the request failed for good (counted as unparsed)
    written: float | None = None  # the grade written in `raw` when `value` is the expected grade

    def to_json(self) -> dict[str, Any]:
        out = {"raw": self.raw, "value": self.value, "finish_reason": self.finish_reason}
        return out | ({"error": self.error} if self.error else {}) | (
            {"written": self.written} if self.written is not None else {})


@dataclass
class Judge:
    """Asks an LLM judge through a backend: a `ChatClient` (any OpenAI-compatible server; supports the
    structured-outputs constraint) or any ChatBackend with `complete` (transformers generate)."""

    backend: Any
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 42
    constrained: bool = False
    templates: str | None = None
    expected_grade: bool = False
    calls: int = field(default=0, init=False)

    def _regex(self, verdict: str) -> str:
        room = max(0, self.max_tokens - 12)  # a token is at least one character: the verdict always fits
        return f"[^\\[\\]]{{0,{room}}}{verdict}"

    async def ask(self, messages: list[dict[str, str]], regex: str,
                  logprobs: bool = False) -> tuple[str, str | None, list[dict[str, Any]] | None]:
        """The judge's text, finish reason and (when asked for and given) its tokens' logprobs."""
        from wrpo.data.sampling import SamplingParams

        self.calls += 1
        if hasattr(self.backend, "post"):
            body: dict[str, Any] = {"model": self.backend.model, "messages": messages, "n": 1,
                                    "temperature": self.temperature, "max_tokens": self.max_tokens,
                                    "seed": self.seed}
            if self.constrained:
                body["structured_outputs"] = {"regex": regex}
            if logprobs:
                body |= {"logprobs": True, "top_logprobs": 20}
            data = await self.backend.post(body)
            choice = (data.get("choices") or [{}])[0]
            content = ((choice.get("logprobs") or {}).get("content")) if logprobs else None
            return (choice.get("message") or {}).get("content") or "", choice.get("finish_reason"), content
        params = SamplingParams(n=1, temperature=self.temperature, top_p=1.0, max_tokens=self.max_tokens,
                                seed=self.seed)
        got = await self.backend.complete(messages, params, 1, self.seed)
        return (got.responses or [""])[0], (got.finish_reasons or [None])[0], None

    async def _verdict(self, messages: list[dict[str, str]], regex: str, parse: Any,
                       expected: bool = False) -> Verdict:
        from wrpo.data.sampling import SamplingError

        try:
            raw, reason, tokens = await self.ask(messages, regex, expected)
        except SamplingError as e:  # a request that failed for good is an unparsed verdict, with its reason
            return Verdict("", None, None, str(e)[:500])
        value = parse(raw)
        if expected and value is not None:  # only a verdict in the format has a grade token to weigh
            weighted = expected_grade(tokens)
            if weighted is not None:
                return Verdict(raw, weighted, reason, written=value)
        return Verdict(raw, value, reason)

    async def grade(self, dialogue: Dialogue) -> Verdict:
        """MT-Bench-style 1-10 grade of the last answer of `dialogue`."""
        if not dialogue.answers[-1].strip():
            return Verdict("", None, None, "empty answer: not sent to the judge")
        messages = load_template("single", self.templates).messages(**single_values(dialogue))
        return await self._verdict(messages, self._regex(r"Rating: \[\[([1-9]|10)\]\]"), parse_grade,
                                   self.expected_grade)

    async def compare(self, a: Dialogue, b: Dialogue) -> Verdict:
        """Which of two answers to the same dialogue is better: A, B or C (tie)."""
        messages = load_template("pairwise", self.templates).messages(**pairwise_values(a, b))
        return await self._verdict(messages, self._regex(r"\[\[(A|B|C)\]\]"), parse_pairwise)

    async def compare_both(self, model: Dialogue, baseline: Dialogue) -> tuple[Outcome, Verdict, Verdict]:
        """Both orders (model as A, then as B) and the outcome for `model`."""
        first, second = await asyncio.gather(self.compare(model, baseline), self.compare(baseline, model))
        return combine(first.value, second.value), first, second
