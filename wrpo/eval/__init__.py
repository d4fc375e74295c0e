"""Evaluation (docs/eval.md): prompts and question files, answering, statistics, the eval stage's body and its
table. May import `wrpo.pipeline` and `wrpo.data`."""
