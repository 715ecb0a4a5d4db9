"""From a prompt to an answer: the `Backend` contract and its typed events, the local `Engine`,
the scheduler (admit, step, cancel) with its per-row token pipeline (sampler, hooks: schema
constraint, stop texts), decode paths and KV caches, and what any backend streams.

May import: models, prompt, media, base. The model layer never prints.
"""
