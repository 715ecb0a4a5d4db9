"""From a prompt to an answer: the `Backend` contract and its typed events, the local `Engine` (ask
and chat: a batch of one), the one scheduler (admit, step, remove) with its per-row token pipeline
(sampler, hooks: schema constraint, stop texts, logprobs), the model's side of a row (`Runner`), the
KV caches and their budget, and what any backend streams.

Inside: leaves (backend, streaming, pipeline, kvrows, kvbudget, logprobs, stops, constraints) ←
runner ← prefixpool ← scheduler ← local.

May import: models, prompt, media, base. The model layer never prints.
"""
