"""What a user attaches, from hostile bytes: images (files, stdin, URLs, clipboard, PDF pages) and
videos, allow-listed, capped, decoded in helper processes with a time budget; frames to pixels.

May import: base only.
"""
