"""Saved conversations: the file format and its atomic writes, continuing one (`--resume`, `-c`,
`/load`), and Markdown export of hostile text.

May import: client (discovery), engine, models, prompt, media, base.
"""
