"""Data construction: prompts, sampling, serving, scoring, selection, and the data stages' bodies.

`prepare.py` (load, normalise, split), `sampling.py` and
`sampling_batch.py` (OpenAI-compatible clients, vLLM batch files, transformers generate), `serving.py`
(a stage's servers: given endpoints or local vLLM subprocesses), `backends.py` (chat clients, judges and
the reward scorer a stage talks to; the eval stage uses them too), `scoring.py` (reward models),
`selection.py` (y_ws, y_wt, y_l, contributions), `stages.py` (the bodies of prepare … build-pairs).

May import: `wrpo.errors`, `wrpo.storage`, `wrpo.pipeline` (spec, plan, context, rundir, workdir).
Never `wrpo.engine`. See docs/architecture.md.
"""
