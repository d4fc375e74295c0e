"""No traceback on any input (docs/spec.md, "Validation"): the spec loader is fuzzed with hypothesis, a few
thousand inputs in all: random text, YAML built from its own tokens (anchors, aliases, merge keys, tags, flow
and block collections), mutations of a valid spec, and random values at random places of a valid spec. Each
input either loads or is refused with a SpecError whose every line names the file; nothing else escapes.
Derandomized, so CI sees the same inputs every run."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wrpo.errors import SpecError
from wrpo.pipeline.spec import load_spec_text, parse_spec
from wrpo.pipeline.strict_yaml import load_yaml

VALID = (Path(__file__).resolve().parents[1] / "corpus" / "valid-spec.yaml").read_text()
RUN = (Path(__file__).resolve().parents[1] / "corpus" / "valid-run.yaml").read_text()
FUZZ = settings(
    max_examples=800,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TOKENS = [
    "a",
    "b",
    "n",
    "yes",
    "010",
    "1_0",
    "0x1F",
    "1e3",
    "5.0",
    ".nan",
    "-.inf",
    "~",
    "null",
    "true",
    "''",
    '"x\\u00e9"',
    ":",
    ": ",
    "- ",
    "-",
    "? ",
    ",",
    "[",
    "]",
    "{",
    "}",
    "&a ",
    "&b ",
    "*a",
    "*b",
    "<<: ",
    "!!str ",
    "!!int ",
    "!!float ",
    "!!bool ",
    "!!map ",
    "!!binary ",
    "!x ",
    "!<tag:yaml.org,2002:str> ",
    "'",
    '"',
    "#c",
    "|",
    ">",
    "|-",
    "\n",
    "\n  ",
    "\n    ",
    "\t",
    " ",
    "---",
    "...",
    "%YAML 1.1\n",
    "\r\n",
    "\ufeff",
    "\x00",
    "\x85",
    "sources",
    "target",
    "model",
    "cluster",
    "tolerations",
    "volumes",
]


def _loads_or_refuses(text: str, source: str = "f.yaml") -> None:
    try:
        load_yaml(text, source)
    except SpecError as e:
        assert all(line.startswith(source) for line in str(e).splitlines()), str(e)


def _spec_or_refused(text: str, source: str = "f.yaml") -> None:
    try:
        load_spec_text(text, source)
    except SpecError as e:
        assert str(e) and all(line.startswith(source) for line in str(e).splitlines()), str(e)


@FUZZ
@given(st.text(max_size=200))
def test_random_text(text):
    _loads_or_refuses(text)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map("".join))
def test_yaml_from_its_own_tokens(text):
    _loads_or_refuses(text)
    _spec_or_refused(text)


@st.composite
def _mutations(draw) -> str:
    text = draw(st.sampled_from([VALID, RUN]))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 8))
        text = text[:at] + draw(st.sampled_from(TOKENS + [""])) + text[at + cut :]
    return text


@FUZZ
@given(_mutations())
def test_mutated_valid_specs(text):
    _spec_or_refused(text)


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["s3://b", "./x", "Exists", "NoExecute", "scratch", "/work", "--port"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "key",
                    "operator",
                    "value",
                    "effect",
                    "tolerationSeconds",
                    "mountPath",
                    "model",
                    "emptyDir",
                    "gpus",
                    "x",
                ]
            ),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)
_PATHS = [
    "target",
    "target.model",
    "target.vllmArgs",
    "sources",
    "sources.0",
    "sources.0.endpoint",
    "reward",
    "reward.judge",
    "dataset",
    "dataset.maxPrompts",
    "dataset.seed",
    "sampling.seed",
    "eval",
    "eval.judge",
    "storage.runUri",
    "cluster",
    "cluster.tolerations",
    "cluster.tolerations.0",
    "cluster.pods.vllm",
    "cluster.pods.training.volumes",
    "cluster.pods.training.volumeMounts",
    "cluster.training",
    "cluster.schedulingPolicy",
    "cluster.env",
    "cluster.podAnnotations",
    "cluster.runtimeImage",
]


def _base() -> dict:
    data, _ = load_yaml(VALID, "valid-spec.yaml")
    data["cluster"]["tolerations"] = [{"operator": "Exists"}]
    return data


@FUZZ
@given(st.sampled_from(_PATHS), _VALUES, st.booleans())
def test_random_values_at_random_places(path, value, cluster):
    data = _base()
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    node[int(last) if last.isdigit() else last] = value
    try:
        parse_spec(json.loads(json.dumps(data)), "f.yaml", cluster=cluster)
    except SpecError as e:
        assert all(line.startswith("f.yaml") for line in str(e).splitlines()), str(e)
