"""A conversation and its prompt: history, rendering in the family's format or the checkpoint's
chat template (sandboxed), prompt text to token ids (user text never becomes a control token),
and trimming to the context window.

May import: media, base.
"""
