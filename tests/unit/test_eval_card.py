"""The model card (wrpo.pipeline.card) and `wrpo export` (wrpo.eval.export) on a run directory made here."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat

import pytest

from wrpo.errors import WrpoError
from wrpo.eval.export import CHECKSUMS, export_model, verify_export
from wrpo.pipeline.card import TargetCard, model_card, parse_front_matter, read_target_card, spec_digest
from wrpo.pipeline.plan import stage_hashes
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.spec import parse_spec
from wrpo.storage import StorageError

SPEC = parse_spec({
    "target": {"model": "/models/llama-3-8b-instruct"},
    "sources": [{"name": "gemma", "model": "google/gemma-2-27b-it"},
                {"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "big-model"}},
                {"name": "qwen", "model": "s3://bucket/models/qwen2-72b"}],
    "dataset": {"uri": "s3://bucket/data/ultrafeedback.parquet"},
})
CONTRIB = {"counts": {"gemma": 6, "api": 3, "qwen": 1}, "shares": {"gemma": 0.6, "api": 0.3, "qwen": 0.1}}


def test_the_card_parses_and_names_every_source_and_its_share():
    card = model_card(SPEC, stage_hashes(SPEC), CONTRIB, {"steps": 12, "train_loss": 0.61}, "| model | x |")
    meta = parse_front_matter(card)
    # a target given as a folder without a Hub id, a dataset file: neither enters the header
    assert "base_model" not in meta and "datasets" not in meta and "wrpo" in meta["tags"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["fusion"]["sources"] == [{"name": "gemma", "model": "google/gemma-2-27b-it"},
                                         {"name": "api", "endpoint_model": "big-model"}, {"name": "qwen"}]
    for src, model, share in (("gemma", "google/gemma-2-27b-it", "60.0%"), ("api", "big-model (endpoint)", "30.0%"),
                              ("qwen", "qwen2-72b", "10.0%")):
        assert f"| {src} | `{model}` | {share} |" in card
    assert "ArmoRM-Llama3-8B-v0.1" in card and "| WRPO | objective, β, α (schedule) | dpo, 0.01, 0.1 (linear) |" in card
    assert spec_digest(SPEC) in card and stage_hashes(SPEC)["wrpo"][:16] in card
    assert "| model | x |" in card and "s3://" not in card and "/models/" not in card
    assert "Prompts: `ultrafeedback.parquet`" in card and "`llama-3-8b-instruct` fused with 3" in card
    assert "Not evaluated yet" in model_card(SPEC, stage_hashes(SPEC))
    with pytest.raises(ValueError, match="starts with '---'"):
        parse_front_matter("# no metadata")


RESULTS = {"prompts": 8, "source": "the held-out eval split", "comparisons": {
    "fused_vs_target": {"rm": {"win_rate": 0.625, "lc_win_rate": 0.581}, "judge": {"win_rate": 0.5625}},
    "fused_vs_sft": {"rm": {"win_rate": 0.55}}, "sft_vs_target": {"rm": {"win_rate": 0.51}}}}


def test_the_header_is_what_the_hub_accepts_with_base_model_license_and_eval_results(tmp_path):
    """Checked with huggingface_hub's own parser (offline): ModelCard, its ModelCardData and the model-index
    round trip to EvalResults."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    hub_cache = tmp_path / "hub" / "datasets--HuggingFaceH4--ultrafeedback_binarized" / "snapshots" / "abc"
    spec = parse_spec({"target": {"model": "meta-llama/Meta-Llama-3-8B-Instruct"},
                       "sources": [{"name": "gemma", "model": "google/gemma-2-27b-it"}],
                       "dataset": {"uri": str(hub_cache / "data" / "train_prefs.parquet")}})
    target = TargetCard("meta-llama/Meta-Llama-3-8B-Instruct", {"license": "llama3"})
    card = ModelCard(model_card(spec, stage_hashes(spec), eval_table="| t |", name="llama3-wrpo", target=target,
                                eval_results=RESULTS))
    data = card.data
    assert data.base_model == "meta-llama/Meta-Llama-3-8B-Instruct" and data.license == "llama3"
    assert data.datasets == ["HuggingFaceH4/ultrafeedback_binarized"] and "model-fusion" in data.tags
    assert data.to_dict()["fusion"]["sources"] == [{"name": "gemma", "model": "google/gemma-2-27b-it"}]
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == data.model_name == "llama3-wrpo"
    got = {(r.metric_type, r.metric_value) for r in results}
    assert got == {("win_rate", 62.5), ("lc_win_rate", 58.1), ("judge_win_rate", 56.2), ("win_rate_vs_sft", 55.0)}
    assert {(r.task_type, r.dataset_type, r.dataset_name) for r in results} == {
        ("text-generation", "HuggingFaceH4/ultrafeedback_binarized", "held-out eval split")}
    assert {r.metric_type for r in data.eval_results} == {t for t, _ in got}
    assert "/snapshots/" not in card.content and str(tmp_path) not in card.content


def test_the_target_card_names_a_hub_id_only_when_the_folder_records_one(tmp_path, monkeypatch):
    plain = tmp_path / "llama-3-8b-instruct"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"_name_or_path": "/fsx/checkpoints/llama"}))
    assert read_target_card(str(plain)) == TargetCard(None, {})  # never the folder's name or a path
    (plain / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct"}))
    (plain / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n"
                                     "base_model: meta-llama/Meta-Llama-3-8B\n---\n# Llama 3\n")
    assert read_target_card(str(plain)) == TargetCard("meta-llama/Meta-Llama-3-8B-Instruct", {
        "license": "other", "license_name": "llama3",  # the target's LICENSE file, in its own repo
        "license_link": "https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/blob/main/LICENSE"})
    (plain / "config.json").write_text("{}")  # no Hub id: a relative link would point nowhere
    assert read_target_card(str(plain)) == TargetCard(None, {"license": "other", "license_name": "llama3"})
    cached = tmp_path / "hub" / "models--Qwen--Qwen2-0.5B-Instruct" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    (cached / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert read_target_card(str(cached) + "/") == TargetCard("Qwen/Qwen2-0.5B-Instruct", {"license": "apache-2.0"})
    # a Hub id: its card from the local Hugging Face cache (offline here)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (cached.parents[1] / "refs").mkdir()
    (cached.parents[1] / "refs" / "main").write_text("abc")
    assert read_target_card("Qwen/Qwen2-0.5B-Instruct") == TargetCard("Qwen/Qwen2-0.5B-Instruct",
                                                                      {"license": "apache-2.0"})
    assert read_target_card("nobody/not-cached") == TargetCard("nobody/not-cached", {})


def _commit(run: RunDir, stage: str, objects: dict[str, bytes], spec_hash: str, inputs=None) -> None:
    out = run.stage(stage).writer()
    for name, data in objects.items():
        out.put_bytes(name, data)
    out.commit(spec_hash=spec_hash, inputs=inputs or {})


@pytest.fixture
def run(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    _commit(run, "wrpo", {"model/model.safetensors": b"\x00weights" * 100, "model/config.json": b"{}",
                          "model/training_args.json": b'{"learning_rate": 1e-06}',
                          "model/training_args.bin": pickle.dumps({"learning_rate": 1e-6}),
                          "model/optimizer.pt": b"PK\x03\x04",
                          "model/README.md": b"---\nbase_model: x\n---\n# wrpo card\n",
                          "metrics.jsonl": b""}, "w1")
    return run


def test_export_to_a_folder_with_checksums_and_the_eval_card(run, tmp_path):
    dest = tmp_path / "published"
    _commit(run, "eval", {"README.md": b"---\nbase_model: x\n---\n# eval card\n"}, "e1", {"wrpo": "w1"})
    result = export_model(run.uri, str(dest))
    assert result["card"] == "eval" and sorted(p.name for p in dest.iterdir()) == [
        "README.md", CHECKSUMS, "config.json", "model.safetensors", "training_args.json"]
    assert result["left_out"] == ["optimizer.pt", "training_args.bin"]  # pickles never ship
    assert (dest / "README.md").read_text().endswith("# eval card\n")
    sums = dict(reversed(line.split("  ")) for line in (dest / CHECKSUMS).read_text().splitlines())
    for name, digest in sums.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    assert verify_export(str(dest)) == []
    (dest / "config.json").write_text('{"tampered": 1}')
    assert verify_export(str(dest)) == ["config.json"]


def test_a_stale_eval_card_is_not_shipped(run, tmp_path):
    _commit(run, "eval", {"README.md": b"# eval of an older model\n"}, "e0", {"wrpo": "w0"})
    assert export_model(run.uri, str(tmp_path / "d"))["card"] == "wrpo"
    assert (tmp_path / "d" / "README.md").read_text().endswith("# wrpo card\n")


def test_export_checks_the_model_against_its_manifest(run, tmp_path):
    (tmp_path / "run" / "wrpo" / "model" / "config.json").write_text('{"changed": true}')
    with pytest.raises(StorageError, match="config.json: content does not match the manifest"):
        export_model(run.uri, str(tmp_path / "d"))
    assert not (tmp_path / "d" / CHECKSUMS).exists()  # written last: an incomplete export has none


def test_export_needs_a_committed_wrpo_stage(tmp_path):
    with pytest.raises(WrpoError, match="wrpo stage is not committed"):
        export_model(str(tmp_path / "empty"), str(tmp_path / "d"))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_an_export_is_readable_by_a_serving_account_whatever_the_umask(run, tmp_path, mask):
    old = os.umask(mask)
    try:
        export_model(run.uri, str(tmp_path / "pub" / "fused"))
    finally:
        os.umask(old)
    files = list((tmp_path / "pub" / "fused").iterdir())
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "pub", tmp_path / "pub" / "fused")} == {0o755}


def test_an_export_without_safetensors_weights_is_refused(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    _commit(run, "wrpo", {"model/pytorch_model.bin": pickle.dumps({}), "model/config.json": b"{}"}, "w1")
    with pytest.raises(WrpoError, match="no safetensors weights .*ships no pickles"):
        export_model(run.uri, str(tmp_path / "d"))


def test_the_saved_model_carries_its_training_arguments_as_json_not_a_pickle(tmp_path):
    """save_final (wrpo.engine.common) on a real transformers Trainer with a tiny random model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from wrpo.engine.common import save_final
    from wrpo.models.tiny import write_tiny_tokenizer

    tok = write_tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=3e-6, report_to="none")
    folder = save_final(Trainer(model=model, args=args), tok, tmp_path / "out")
    assert json.loads((folder / "training_args.json").read_text())["learning_rate"] == 3e-6
    assert not list(folder.glob("*.bin")) and list(folder.glob("*.safetensors"))
