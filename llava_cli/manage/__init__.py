"""The small commands about models and saved things: `llava models`, `pull`, `show`, `rm`,
`tokens` and `sessions`.

May import: frontend, store, client, engine, models, prompt, media, base (never ask, chat, serve, cli).
"""
