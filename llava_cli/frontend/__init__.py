"""What several front-ends share and that knows no model: the `IMAGE... [PROMPT]` grammar, the
output writers and record keys, SIGTERM as an exception, and starting a backend for a front-end.

May import: store, client, engine, models, prompt, media, base.
"""
