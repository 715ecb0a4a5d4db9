"""`llava serve`: an OpenAI-compatible HTTP server over the engine's scheduler (requests validated
into jobs, a guard on who may ask, one worker thread stepping the batch, metrics, logs, keep-alive).

May import: frontend, store, client, engine, models, prompt, media, base (never ask, chat, manage, cli).
"""
