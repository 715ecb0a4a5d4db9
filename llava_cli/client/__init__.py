"""Answers through an OpenAI-compatible server (`--server`, a discovered `llava serve`): the
`RemoteEngine` backend and finding a running server.

May import: engine (the backend contract), prompt, media, base.
"""
