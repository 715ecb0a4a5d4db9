"""`llava ask` and `llava ask --each`: one question about some images, or one answer per image of a
folder or list, in input order, resumable (`-o`), locally, through a server or on Ray actors.

May import: frontend, store, client, engine, models, prompt, media, base (never chat, serve, manage, cli).
"""
