"""`FusionSpec`: the one description of a fusion pipeline, for `wrpo run` and for the FusionRun CRD.

Every option is a typed field with a description and the paper's default (ICLR 2025, Sec. 4 and App. A).
Keys are camelCase in YAML and in the CRD (Kubernetes convention); Python attributes are snake_case.
Unknown keys are errors. This module imports only pydantic and yaml, so the operator image can use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
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

from wrpo.errors import SpecError

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        validate_default=True,
        frozen=True,
    )


UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]


class TargetSpec(_Model):
    """The target LLM that absorbs the sources' abilities (the paper: Llama-3-8B-Instruct)."""

    model: str = Field(min_length=1, description="Model folder, s3:// URI or hub id of the target LLM.")
    served_name: str = Field(default="target", pattern=DNS_LABEL, max_length=63,
                             description="Name the vLLM server serves it as.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM tensor-parallel size for sample-target.")
    replicas: int = Field(default=1, ge=1, le=64,
                          description="Data-parallel vLLM replicas of Target-SFT for sample-target.")
    vllm_args: list[str] = Field(default_factory=list, description="Extra `vllm serve` arguments.")


class EndpointSpec(_Model):
    """An external OpenAI-compatible server (vLLM elsewhere, or a proprietary API)."""

    url: str = Field(pattern=r"^https?://", description="Base URL up to /v1, e.g. https://api.example.com/v1.")
    model: str = Field(min_length=1, description="The model name the server expects in requests.")
    api_key_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the API key (never logged).",
    )
    api_key_file: str | None = Field(default=None, description="File (e.g. a mounted Secret) holding the API key.")
    api_key_secret: str | None = Field(
        default=None, pattern=DNS_LABEL, max_length=63,
        description="Cluster only: Secret (key `api-key`) exposed to the sampling Job as `apiKeyEnv`.",
    )

    @model_validator(mode="after")
    def _secret_needs_env(self) -> EndpointSpec:
        if self.api_key_secret and not self.api_key_env:
            raise ValueError("'apiKeySecret' needs 'apiKeyEnv': the variable the Secret's key is exposed as")
        return self


class SourceSpec(_Model):
    """A source LLM: either a model served by vLLM (`model`) or an external `endpoint`, never both."""

    name: str = Field(pattern=DNS_LABEL, max_length=40, description="Unique DNS-label name of the source.")
    model: str | None = Field(default=None, description="Model folder, s3:// URI or hub id served by vLLM.")
    endpoint: EndpointSpec | None = Field(default=None, description="An external OpenAI-compatible endpoint.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="vLLM tensor-parallel size (GPUs).")
    replicas: int = Field(default=1, ge=1, le=64,
                          description="Data-parallel vLLM replicas; requests are spread across them.")
    max_model_len: int | None = Field(default=None, ge=128, description="vLLM --max-model-len.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0, description="vLLM GPU memory share.")
    vllm_args: list[str] = Field(default_factory=list, description="Extra `vllm serve` arguments.")
    group: str | None = Field(default=None, description="Optional group name for source subsets.")

    @model_validator(mode="after")
    def _one_of(self) -> SourceSpec:
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("a source needs exactly one of 'model' and 'endpoint'")
        return self


class RewardSpec(_Model):
    """The reward model that scores every response (the paper: ArmoRM-Llama3-8B-v0.1)."""

    type: Literal["sequence-classification", "armorm", "remote"] = Field(
        default="armorm", description="In-process HF classifier, ArmoRM custom code, or a vLLM /pooling endpoint."
    )
    model: str | None = Field(default="RLHFlow/ArmoRM-Llama3-8B-v0.1", description="Model folder/URI/hub id.")
    endpoint: str | None = Field(default=None, pattern=r"^https?://", description="Base URL for type=remote.")
    max_length: int = Field(default=4096, ge=16, description="Tokens per (prompt, response) pair; longer is cut.")
    batch_size: int = Field(default=8, ge=1, description="Pairs per forward pass.")
    served_name: str = Field(default="reward", pattern=DNS_LABEL, max_length=63,
                             description="vLLM served name for type=remote.")

    @model_validator(mode="after")
    def _needs(self) -> RewardSpec:
        if self.type == "remote" and not self.endpoint and not self.model:
            raise ValueError("type 'remote' needs 'endpoint' (or 'model' for a locally served pooling model)")
        if self.type != "remote" and not self.model:
            raise ValueError(f"type '{self.type}' needs 'model'")
        return self


class DatasetSpec(_Model):
    """The prompt dataset and its deterministic split (paper: UltraFeedback, ⅓ SFT, ⅔ preference)."""

    uri: str = Field(min_length=1, description="JSONL/Parquet file or `datasets` folder, local or s3://.")
    format: Literal["auto", "jsonl", "parquet", "hf-disk"] = Field(default="auto", description="Input format.")
    prompt_field: str = Field(default="prompt", description="Field with the prompt (string or chat messages).")
    id_field: str | None = Field(default="prompt_id", description="Field with a stable id; hashed text if absent.")
    sft_fraction: UnitFloat = Field(default=1 / 3, description="Share of prompts for Target-SFT.")
    eval_size: int = Field(default=0, ge=0, description="Prompts held out for evaluation (from the PO split).")
    seed: int = Field(default=42, description="Seed of the hash-based split.")
    max_prompts: int | None = Field(default=None, ge=1, description="Use only this many prompts (after dedup).")


class SamplingSpec(_Model):
    """How responses are sampled from sources and from Target-SFT (paper: N=5, T=0.8, top-p 0.95)."""

    n: int = Field(default=5, ge=1, le=64, description="Responses per prompt and model (N).")
    temperature: float = Field(default=0.8, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling p.")
    max_tokens: int = Field(default=2048, ge=1, description="Maximum new tokens per response.")
    seed: int = Field(default=42, description="Sampling seed sent to the server.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    concurrency: int = Field(default=32, ge=1, description="Concurrent requests per server.")
    request_timeout_s: float = Field(default=600.0, gt=0, description="Timeout of one request.")
    max_retries: int = Field(default=8, ge=0, description="Retries on 429/5xx/connection errors.")
    shard_size: int = Field(default=256, ge=1, description="Prompts per committed output shard.")


class SelectionSpec(_Model):
    """How y_ws, y_wt, y_l are chosen (Sec. 3.1; rank-k Table 9; y_ls App. F)."""

    source_rank: int = Field(default=1, ge=1, description="Use the k-th best source answer as y_ws (Table 9).")
    source_groups: list[str] | None = Field(default=None, description="Only sources in these groups/names.")
    min_reward_gap: float = Field(default=0.0, ge=0.0, description="Drop pairs with score(y_wt)-score(y_l) below.")
    rejected_source: bool = Field(default=False, description="Also keep y_ls, the worst answer of y_ws's source.")
    top_k_sources: int = Field(default=1, ge=1, description="Keep this many best source answers (beyond paper).")


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
    rejected_source: bool = Field(default=False, description="Eq. 9: also push down y_ls.")
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
            raise ValueError("'maxPromptLength' must be smaller than 'maxLength'")
        return self


class TrainingSpec(_Model):
    """Settings shared by SFT and WRPO training."""

    deepspeed_stage: Literal[0, 2, 3] = Field(default=3, description="DeepSpeed ZeRO stage (0 = off).")
    gradient_checkpointing: bool = Field(default=True, description="Trade compute for activation memory.")
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description="auto = bf16 on GPU, else fp32.")
    seed: int = Field(default=42, description="Training seed.")
    save_steps: int = Field(default=500, ge=1, description="Checkpoint every this many optimizer steps.")


class StorageSpec(_Model):
    """Where the run directory lives (a folder or s3://bucket/prefix) and how to reach S3."""

    run_uri: str | None = Field(default=None, description="Run directory; `wrpo run --run-uri` overrides it.")
    s3_endpoint: str | None = Field(default=None, pattern=r"^https?://", description="S3 endpoint URL.")
    s3_region: str | None = Field(default=None, description="S3 region.")
    credentials_secret: str | None = Field(
        default=None, pattern=DNS_LABEL, max_length=63,
        description="Cluster only: Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.",
    )


class StageResources(_Model):
    """Resources of one kind of stage pod."""

    gpus: int = Field(default=0, ge=0, description="nvidia.com/gpu per pod.")
    cpu: str = Field(default="2", description="CPU request.")
    memory: str = Field(default="8Gi", description="Memory request.")
    nodes: int = Field(default=1, ge=1, description="Nodes (PyTorchJob: Master + nodes-1 Workers).")
    procs_per_node: int = Field(default=1, ge=1, description="torchrun --nproc-per-node.")
    parallelism: int = Field(default=1, ge=1, le=1024, description=(
        "Scoring and reference log-probs: shards run as an Indexed Job of this many pods at once, each "
        "shard committed on its own (capped by cluster.gpuBudget)."))


class VLLMResources(_Model):
    """Resources of each vLLM server pod."""

    gpus: int | None = Field(default=None, ge=0, description="nvidia.com/gpu per server (default: tensorParallelSize).")
    cpu: str = Field(default="4", description="CPU request.")
    memory: str = Field(default="32Gi", description="Memory request.")
    shm_size: str = Field(default="8Gi", description="Size of the /dev/shm emptyDir.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment of the vLLM container (e.g. VLLM_CPU_KVCACHE_SPACE).")


class ClusterSpec(_Model):
    """Cluster-only settings; `wrpo run` ignores them."""

    gpu_budget: int | None = Field(default=None, ge=1, description=(
        "Most nvidia.com/gpu the run's servers and jobs hold at once: source units run as a sliding window "
        "under it (unset: every source's server at once)."))
    runtime_image: str = Field(default="ghcr.io/wrpo/wrpo-runtime:0.1.0", description="Image running `wrpo stage`.")
    vllm_image: str = Field(default="vllm/vllm-openai:v0.11.0", description="Image of the vLLM Deployments.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(default="IfNotPresent")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector of every pod.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of every pod.")
    service_account: str | None = Field(default=None, description="ServiceAccount of stage pods.")
    models_pvc: str | None = Field(default=None, description="PVC with model weights mounted at /models.")
    small: StageResources = Field(default_factory=StageResources, description="prepare/select/build-pairs Jobs.")
    scoring: StageResources = Field(default_factory=lambda: StageResources(gpus=1), description="Scoring Jobs.")
    training: StageResources = Field(
        default_factory=lambda: StageResources(gpus=8, procs_per_node=8, cpu="32", memory="512Gi"),
        description="SFT/WRPO PyTorchJobs.",
    )
    vllm: VLLMResources = Field(default_factory=VLLMResources, description="vLLM server pods.")
    backoff_limit: int = Field(default=2, ge=0, description="Retries of a failed stage pod.")
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the FusionRun this long after it Succeeded or Failed.")
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of every stage pod.")
    active_deadline_seconds: int | None = Field(default=None, ge=60, description="Deadline of one stage.")


class FusionSpec(_Model):
    """A whole fusion: sources → reward → SFT → WRPO, with paper defaults."""

    target: TargetSpec
    sources: list[SourceSpec] = Field(min_length=1, max_length=64, description="The source LLMs (paper: ten, 9B–236B).")
    reward: RewardSpec = Field(default_factory=RewardSpec)
    dataset: DatasetSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    sft: SFTSpec = Field(default_factory=SFTSpec)
    wrpo: WRPOSpec = Field(default_factory=WRPOSpec)
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
            raise ValueError(f"target.servedName '{self.target.served_name}' collides with a source name")
        return self

    @model_validator(mode="after")
    def _fits_the_gpu_budget(self) -> FusionSpec:
        """Every single server or job must fit in `cluster.gpuBudget`, or the run could never progress."""
        c = self.cluster
        if c.gpu_budget is None:
            return self

        def server(tp: int, replicas: int) -> int:
            return (tp if c.vllm.gpus is None else c.vllm.gpus) * replicas

        needs = [(f"sources[{i}] ({s.name}): tensorParallelSize × replicas", server(s.tensor_parallel_size, s.replicas))
                 for i, s in enumerate(self.sources) if s.model]
        needs += [("target: tensorParallelSize × replicas",
                   server(self.target.tensor_parallel_size, self.target.replicas)),
                  ("cluster.training: gpus × nodes", c.training.gpus * c.training.nodes),
                  ("cluster.scoring.gpus", c.scoring.gpus)]
        over = [f"{what} needs {n} GPUs" for what, n in needs if n > c.gpu_budget]
        if over:
            raise ValueError(f"cluster.gpuBudget {c.gpu_budget} is smaller than what one server or job needs: "
                             + "; ".join(over))
        return self

    def section_hash(self, *sections: str) -> str:
        """sha256 over the named top-level sections (for per-stage invalidation)."""
        data = self.model_dump(mode="json", by_alias=True)
        blob = json.dumps({k: data[k] for k in sections}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _loc(err: dict[str, Any]) -> str:
    """`sources[1].endpoint.url` style, as the user wrote it (camelCase)."""
    out = ""
    for part in err["loc"]:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<spec>"


def format_validation_error(e: ValidationError, source: str) -> str:
    """One line per problem, each naming the field path as written in YAML (camelCase)."""
    lines = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; keys are camelCase)"
        lines.append(f"{source}: {_loc(err)}: {msg}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "<spec>") -> FusionSpec:
    """Validate a mapping as a FusionSpec; errors name the source and every offending field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a FusionSpec must be a mapping, got {type(data).__name__}")
    try:
        return FusionSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source)) from None


def load_spec(path: str | Path) -> FusionSpec:
    """Load a FusionSpec from YAML. A FusionRun manifest (kind: FusionRun) is accepted: its .spec is used.

    Relative local paths in the spec are resolved against the spec file's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if isinstance(data, dict) and data.get("kind") == "FusionRun":
        data = data.get("spec")
    spec = parse_spec(data, str(path))
    return resolve_paths(spec, path.parent)


def resolve_paths(spec: FusionSpec, base: Path) -> FusionSpec:
    """Turn `./relative` model/dataset paths into absolute ones so runs work from any directory."""

    def fix(v: str | None) -> str | None:
        if v and v.startswith(("./", "../")):
            return str((base / v).resolve())
        return v

    data = spec.model_dump(by_alias=False)
    data["target"]["model"] = fix(data["target"]["model"])
    for src in data["sources"]:
        src["model"] = fix(src["model"])
    data["reward"]["model"] = fix(data["reward"]["model"])
    data["dataset"]["uri"] = fix(data["dataset"]["uri"])
    if data["storage"]["run_uri"]:
        data["storage"]["run_uri"] = fix(data["storage"]["run_uri"])
    return FusionSpec.model_validate(data)


def spec_json_schema() -> dict[str, Any]:
    """The JSON schema (camelCase keys) from which the CRD's openAPIV3Schema is generated."""
    return FusionSpec.model_json_schema(by_alias=True, mode="validation")
