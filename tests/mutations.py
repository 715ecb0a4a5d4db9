"""A hypothesis strategy shared by the fuzz tests: valid files with a few bytes flipped, cut,
spliced from another seed, or inserted, the damage a transfer or an attacker does."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "truncate", "splice", "insert"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if operation == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif operation == "truncate":
            del data[position:]
        elif operation == "splice":
            donor = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(donor) - 1))
            data[position : position + draw(st.integers(0, 64))] = donor[start : start + draw(st.integers(1, 256))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)
