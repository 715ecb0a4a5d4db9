"""`llava chat`: the chat loop, its terminal and pipe IO, the slash commands, the input line and
the rendering of answers.

May import: frontend, store, client, engine, models, prompt, media, base (never ask, serve, manage, cli).
"""
