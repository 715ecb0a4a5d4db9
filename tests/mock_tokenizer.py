"""A byte-level tokenizer small enough to read: each token id stands for a few bytes of UTF-8.

Decoding joins the bytes and replaces an incomplete character with U+FFFD, as Hugging Face
tokenizers do, so a character split across tokens looks exactly as it does with a real model.
No files, no model: for the unit tests of what sits around a tokenizer.
"""

from __future__ import annotations

EOS = 0


class MockTokenizer:
    """Token ids 1... are the byte strings of `pieces`, in order; id 0 is the special EOS token."""

    eos_token_id = EOS

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = {index + 1: piece for index, piece in enumerate(pieces)}

    def ids(self, *pieces: bytes) -> list[int]:
        by_piece = {piece: token for token, piece in self.pieces.items()}
        return [by_piece[piece] for piece in pieces]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        data = b"".join(self.pieces[i] if i else (b"" if skip_special_tokens else b"</s>") for i in ids)
        return data.decode("utf-8", errors="replace")
