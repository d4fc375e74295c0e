"""Models made offline: tiny Llama/Qwen2 models, tokenizers and reward models (`tiny.py`), and the
GGUF → safetensors import of SmolLM2 (`gguf_import.py`). May import torch/transformers and `wrpo.errors`."""
