"""Builders of hostile image files that are valid enough to reach a decoder (issue 28 item 4).

Shared by the tests and bench/hostile_decode.py; each returns the file's bytes.
"""

from __future__ import annotations

import io
import struct

EOB_RUN_SCAN_TABLE = bytes([0xFF, 0xC4, 0x00, 0x14, 0x11, 1] + [0] * 15 + [0xE0])  # AC table 1: one code, "0" = EOB14


def eob_run_scan(blocks: int) -> bytes:
    """A progressive AC scan of component 1 (coefficients 1-63) that says "no more coefficients" for `blocks` blocks.

    Each code is "0" (EOB14) plus 14 bits: a run of 32,767 blocks in 15 bits, so a scan of a
    7000x7000 picture is 55 bytes, while libjpeg walks all of its 765,625 blocks."""
    codes = -(-blocks // 32767)
    bits = "011111111111111" * codes
    bits += "1" * (-len(bits) % 8)  # pad with ones
    entropy = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    header = bytes([0xFF, 0xDA, 0x00, 0x08, 1, 1, 0x01, 1, 63, 0])  # 1 component (id 1), DC 0 / AC 1, Ss 1, Se 63
    return header + entropy


def many_scan_jpeg(side: int, scans: int) -> bytes:
    """A grey progressive JPEG of `side` x `side` pixels with `scans` more scans, each a few bytes.

    The extra scans repeat a valid first AC scan (libjpeg does not even warn), and each one walks
    every 8x8 block of the picture: the cost grows with side² x scans, the size with scans only."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=90)
    picture = buffer.getvalue()
    assert picture.endswith(b"\xff\xd9")
    blocks = (-(-side // 8)) ** 2
    return picture[:-2] + EOB_RUN_SCAN_TABLE + eob_run_scan(blocks) * scans + b"\xff\xd9"


def many_strip_tiff(strips: int, side: int = 8, bits_per_sample_values: int = 1) -> bytes:
    """A little-endian greyscale TIFF of `side` x `side` pixels, one row a strip, declaring `strips` strips.

    Every strip points at the same row of pixels. Pillow builds a tile per strip (wrapping round
    the picture again and again) and decodes each one, so the cost grows with `strips`.
    `bits_per_sample_values` > 1 makes BitsPerSample an array of that many 8s."""
    pixels = (bytes(range(64)) * (side * side // 64 + 1))[: side * side]
    entries = [  # (tag, type, count): type 3 SHORT, 4 LONG
        (256, 3, 1),
        (257, 3, 1),
        (258, 3, bits_per_sample_values),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, strips),
        (277, 3, 1),
        (278, 4, 1),
        (279, 4, strips),
    ]
    pixel_offset = 8 + 2 + 12 * len(entries) + 4
    arrays = {  # tag -> its values when there is more than one (stored after the pixels)
        273: struct.pack("<I", pixel_offset) * strips,
        279: struct.pack("<I", side) * strips,
        258: struct.pack("<H", 8) * bits_per_sample_values,
    }
    single = {256: side, 257: side, 258: 8, 259: 1, 262: 1, 273: pixel_offset, 277: 1, 278: 1, 279: side}
    ifd, tail = struct.pack("<H", len(entries)), b""
    for tag, kind, count in entries:
        if count > 1:
            value, tail = pixel_offset + len(pixels) + len(tail), tail + arrays[tag]
            ifd += struct.pack("<HHII", tag, kind, count, value)
        elif kind == 4:
            ifd += struct.pack("<HHII", tag, kind, count, single[tag])
        else:
            ifd += struct.pack("<HHIHH", tag, kind, count, single[tag], 0)
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + pixels + tail
