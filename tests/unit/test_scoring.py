"""Reward scorers on the tiny reward model: batched scores equal one-at-a-time raw forwards, ArmoRM's
output contract via a tiny stand-in with custom code, and NaN handling."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from wrpo.data.scoring import (
    ARMORM_OBJECTIVES,
    ArmoRMScorer,
    Score,
    ScoringError,
    SequenceClassifierScorer,
    length_batches,
    score_samples,
)
from wrpo.records import PromptRecord, SampleRecord

PAIRS = [
    ([{"role": "user", "content": "What is the sun?"}], "A star."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
     "Rayleigh scattering of sunlight by the air makes short wavelengths scatter more than long ones."),
    ([{"role": "user", "content": "Hi"}], ""),
    ([{"role": "user", "content": "Count"}], "one two three four five six seven eight nine ten " * 3),
]

# Float64 models, but transformers keeps RoPE's cos/sin and eager attention's softmax in float32: padded and
# unpadded forwards differ at ≤ c·u32 relative, c ≤ 10^2 (tests/unit/test_logps.py's docstring), for scores
# of size ≤ 1 also absolute.
MODEL_REL = 100 * 2**-24


def raw_score(scorer, messages, response):
    ids = torch.tensor([scorer.encoder.encode(messages, response)])
    with torch.inference_mode():
        return float(scorer.model(input_ids=ids).logits[0, 0])


def test_batched_scores_equal_unpadded_forwards(tiny_models):
    scorer = SequenceClassifierScorer(str(tiny_models / "reward"), max_length=512, batch_size=3)
    scorer.model.double()  # float64: padded and unpadded forwards then differ at MODEL_REL, on any CPU
    got = scorer.score(PAIRS)
    want = [raw_score(scorer, m, r) for m, r in PAIRS]
    assert [s.value for s in got] == pytest.approx(want, rel=MODEL_REL, abs=MODEL_REL)
    assert len({round(s.value, 6) for s in got}) == len(PAIRS)


def test_template_is_the_reward_models_and_max_length_cuts(tiny_models):
    short = SequenceClassifierScorer(str(tiny_models / "reward"), max_length=16)
    assert len(short.encoder.encode(*PAIRS[1])) == 16
    full = SequenceClassifierScorer(str(tiny_models / "reward"), max_length=512)
    text = full.tokenizer.decode(full.encoder.encode(*PAIRS[0]))
    assert "<|start_header_id|>assistant" in text and text.count("<|begin_of_text|>") == 1
    assert text.rstrip().endswith("A star.<|eot_id|>")


def test_length_batches_group_similar_lengths():
    assert length_batches([1, 5, 3, 4], 2) == [[1, 3], [2, 0]]


class FixedScorer:
    name = "fixed"

    def __init__(self, values):
        self.values = list(values)

    def score(self, pairs):
        return [Score(self.values.pop(0)) for _ in pairs]


def test_score_samples_aligns_and_stops_on_nan():
    prompts = {"p": PromptRecord(prompt_id="p", prompt=[{"role": "user", "content": "q"}]),
               "q": PromptRecord(prompt_id="q", prompt=[{"role": "user", "content": "r"}])}
    samples = [SampleRecord(prompt_id="p", model="m", responses=["a", "b"]),
               SampleRecord(prompt_id="q", model="m", responses=["c"])]
    recs = score_samples(FixedScorer([1.0, 2.0, 3.0]), samples, prompts, chunk=2)
    assert [r.scores for r in recs] == [[1.0, 2.0], [3.0]] and recs[0].reward_model == "fixed"
    with pytest.raises(ScoringError, match=r"gave nan for prompt 'q' \(model 'm', response 0\)"):
        score_samples(FixedScorer([1.0, 2.0, math.nan]), samples, prompts)
    with pytest.raises(ScoringError, match="gave inf for prompt 'p'"):
        score_samples(FixedScorer([math.inf, 2.0, 1.0]), samples, prompts)
    with pytest.raises(ScoringError, match="not among the prepared prompts"):
        score_samples(FixedScorer([]), samples, {"p": prompts["p"]})


STANDIN_CODE = '''
from dataclasses import dataclass

import torch
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class StandInOutput(ModelOutput):
    rewards: torch.FloatTensor = None
    score: torch.FloatTensor = None
    hidden_state: torch.FloatTensor = None


class StandInArmoRM(LlamaPreTrainedModel):
    """Same output contract and last-token rule as ArmoRM's custom head (tiny and ungated)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, 19, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        h = hidden[torch.arange(hidden.shape[0]), last]
        rewards = self.regression_layer(h)
        return StandInOutput(rewards=rewards, score=rewards.mean(-1, keepdim=True), hidden_state=h)
'''


@pytest.fixture(scope="module")
def armorm_standin(tiny_models, tmp_path_factory):
    """A tiny model with ArmoRM's custom-code contract (auto_map, `.score`, `.rewards`, pad rule)."""
    import importlib.util
    import sys

    from transformers import AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("armorm")
    (root / "modeling_standin.py").write_text(STANDIN_CODE)
    spec = importlib.util.spec_from_file_location("modeling_standin_local", root / "modeling_standin.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["modeling_standin_local"] = mod
    spec.loader.exec_module(mod)
    tok = AutoTokenizer.from_pretrained(tiny_models / "reward")
    cfg = LlamaConfig.from_pretrained(tiny_models / "reward")
    cfg.pad_token_id = tok.pad_token_id
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    torch.manual_seed(0)
    mod.StandInArmoRM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    conf = json.loads((root / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForSequenceClassification": "modeling_standin.StandInArmoRM"}
    conf["architectures"] = ["StandInArmoRM"]
    (root / "config.json").write_text(json.dumps(conf))
    return root


def test_armorm_adapter_scores_and_objectives(armorm_standin):
    scorer = ArmoRMScorer(str(armorm_standin), max_length=512, batch_size=4)
    scorer.model.double()  # float64: batched and single forwards then differ at MODEL_REL, on any CPU
    batched = scorer.score(PAIRS)
    one_by_one = [scorer.score([p])[0] for p in PAIRS]
    assert [s.value for s in batched] == pytest.approx([s.value for s in one_by_one], rel=MODEL_REL, abs=MODEL_REL)
    assert list(batched[0].detail) == list(ARMORM_OBJECTIVES)
    assert batched[0].value == pytest.approx(sum(batched[0].detail.values()) / 19, rel=MODEL_REL, abs=MODEL_REL)


def test_armorm_refuses_eos_as_pad(armorm_standin, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(armorm_standin, bad)
    conf = json.loads((bad / "config.json").read_text())
    from transformers import AutoTokenizer

    conf["pad_token_id"] = AutoTokenizer.from_pretrained(bad).eos_token_id
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ScoringError, match="dedicated pad token"):
        ArmoRMScorer(str(bad))
