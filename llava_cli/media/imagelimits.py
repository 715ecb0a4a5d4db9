"""What an image's bytes make its decoder do, bounded before the decoder runs.

Contract: `check_decoding_work(data, name)` reads only the structure of the bytes (never the
pixels) and raises `InputError` when they ask a decoder for more work than any real picture needs;
otherwise it returns and the bytes go to Pillow. Bytes it cannot make sense of pass: judging them
is the decoder's job. Two costs grow with a count of a few bytes each, not with the pixels:

- **JPEG scans.** Each scan of a progressive JPEG walks every 8x8 block of the picture, and a scan
  can be 55 bytes: 20,000 scans of a 7000x7000 picture are 1.6 MB and a minute of CPU. libjpeg
  decodes them all (a nonsensical progression only warns, and Pillow ignores libjpeg's warnings),
  so scans are counted here, segment by segment up to the first EOI, and more than MAX_JPEG_SCANS
  are refused. nvImageCodec's limit is the same 256; an encoder's progressive JPEG has about 10
  scans (at most 3 per component a baseline image could have, and libjpeg's richest script has 10).
- **TIFF strips and tiles.** Pillow turns every entry of StripOffsets / TileOffsets into a tile to
  decode, wrapping round the picture again and again, so 10 M offsets on an 8x8 picture took 55 s
  and 2.6 GB. The first IFD (the only one decoded) may hold at most the strips or tiles its own
  geometry can use: one strip per row or one tile per 16x16 block (the smallest tile the format
  allows), times the samples per pixel when each sample has its own planes. The arrays of byte
  counts are bounded the same way, a BigTIFF directory by a classic one's 65,535 entries, and any
  other numeric tag (Pillow makes a Python number of each value: 1 M BitsPerSample took 0.5 s) by
  MAX_TIFF_VALUES numbers.
- **JPEG marker segments.** Pillow reads each segment before the first scan in Python and keeps
  every APP segment: 1 M empty ones (4 MB) took 7.6 s and 160 MB, so a 200 MB file would take
  minutes and gigabytes. More than MAX_JPEG_SEGMENTS segments are refused.
"""

from __future__ import annotations

import re
import struct

from llava_cli.base.errors import InputError

MAX_JPEG_SCANS = 256
MAX_JPEG_SEGMENTS = (
    10_000  # marker segments of any kind; real files have 10 to 30, a big XMP split in 64 KB parts some hundreds
)
JPEG_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI: no length field
JPEG_SOS, JPEG_EOI = 0xDA, 0xD9
AFTER_ENTROPY_DATA = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker, not a stuffed 0xFF00 nor a restart
MIN_TILE_SIDE = 16  # TIFF 6.0: tile width and length are multiples of 16
MAX_IFD_ENTRIES = 65535  # a classic TIFF's limit (its count is 16 bits); BigTIFF's 64-bit count is held to it

TIFF_WIDTH, TIFF_LENGTH, TIFF_SAMPLES, TIFF_PLANAR = 256, 257, 277, 284
TIFF_STRIP_ARRAYS = (273, 279)  # StripOffsets, StripByteCounts
TIFF_TILE_ARRAYS = (324, 325)  # TileOffsets, TileByteCounts
TIFF_SHORT, TIFF_LONG, TIFF_LONG8 = 3, 4, 16
TIFF_BYTE_TYPES = {1, 2, 6, 7}  # BYTE, ASCII, SBYTE, UNDEFINED: kept as bytes; other types become a Python number each
MAX_TIFF_VALUES = 1 << 18  # numbers in one tag: beyond a 16-bit colour map (3 x 65,536), the largest real array


def check_decoding_work(data: bytes, name: str) -> None:
    """Raise `InputError` if `data` declares more decoding work than a real picture could need."""
    if data.startswith(b"\xff\xd8"):
        check_jpeg(data, name)
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        check_tiff(data, name)


def check_jpeg(data: bytes, name: str) -> None:
    scans, segments = jpeg_counts(data, MAX_JPEG_SCANS + 1, MAX_JPEG_SEGMENTS + 1)
    if segments > MAX_JPEG_SEGMENTS:
        raise InputError(
            f"{name} is a JPEG of more than {MAX_JPEG_SEGMENTS:,} marker segments (real ones have a few dozen); "
            "re-encode it (e.g. as a baseline JPEG or a PNG)"
        )
    if scans > MAX_JPEG_SCANS:
        raise InputError(
            f"{name} is a JPEG of more than {MAX_JPEG_SCANS} scans (real ones have about 10); "
            "re-encode it (e.g. as a baseline JPEG or a PNG)"
        )


def jpeg_counts(data: bytes, max_scans: int, max_segments: int) -> tuple[int, int]:
    """The numbers of scans (SOS segments) and of all marker segments before the first EOI, each counted
    no further than its `max_`."""
    pos, scans, segments = 2, 0, 0
    while pos + 4 <= len(data) and scans < max_scans and segments < max_segments:
        if data[pos] != 0xFF:
            break  # not a marker: corrupt, the decoder will say so
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in JPEG_STANDALONE_MARKERS:
            pos += 2
        elif marker == JPEG_EOI:
            break
        else:
            segments += 1
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
            if marker == JPEG_SOS:
                scans += 1
                found = AFTER_ENTROPY_DATA.search(data, pos)
                pos = found.start() if found else len(data)
    return scans, segments


def check_tiff(data: bytes, name: str) -> None:
    entries = first_ifd(data, name)
    if entries is None:
        return
    width, length = entries.get(TIFF_WIDTH, (0, 0, 0))[2], entries.get(TIFF_LENGTH, (0, 0, 0))[2]
    planes = entries.get(TIFF_SAMPLES, (0, 1, 1))[2] if entries.get(TIFF_PLANAR, (0, 1, 1))[2] == 2 else 1
    tiles_per_plane = -(-width // MIN_TILE_SIDE) * -(-length // MIN_TILE_SIDE)
    for tags, per_plane, what in ((TIFF_STRIP_ARRAYS, length, "strips"), (TIFF_TILE_ARRAYS, tiles_per_plane, "tiles")):
        usable = max(per_plane, 1) * max(planes, 1)
        declared = max(entries.get(tag, (0, 0, 0))[1] for tag in tags)
        if declared > usable:
            raise InputError(
                f"{name} is a TIFF of {width}x{length} pixels that declares {declared:,} {what}, more than the {usable:,} "
                "such a picture can have; re-save it with an image editor"
            )
    for tag, (kind, count, _) in entries.items():
        if tag not in TIFF_STRIP_ARRAYS + TIFF_TILE_ARRAYS and kind not in TIFF_BYTE_TYPES and count > MAX_TIFF_VALUES:
            raise InputError(
                f"{name} is a TIFF whose tag {tag} holds {count:,} numbers, more than the {MAX_TIFF_VALUES:,} "
                "any real picture needs; re-save it with an image editor"
            )


def first_ifd(data: bytes, name: str) -> dict[int, tuple[int, int, int]] | None:
    """The first IFD of a (Big)TIFF: tag -> (type, count, value if it is one inline SHORT/LONG/LONG8 else 0); None if unreadable."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            offset = struct.unpack_from(order + "Q", data, 8)[0]
            count = struct.unpack_from(order + "Q", data, offset)[0]
            entry_format, entry_size, first = order + "HHQ8s", 20, offset + 8
        else:
            offset = struct.unpack_from(order + "I", data, 4)[0]
            count = struct.unpack_from(order + "H", data, offset)[0]
            entry_format, entry_size, first = order + "HHI4s", 12, offset + 2
        if count > MAX_IFD_ENTRIES:
            raise InputError(
                f"{name} is a TIFF whose directory has {count:,} entries (real ones have about 20); re-save it with an image editor"
            )
        entries = {}
        for index in range(count):
            tag, kind, values, inline = struct.unpack_from(entry_format, data, first + index * entry_size)
            entries[tag] = (kind, values, inline_number(inline, kind, order) if values == 1 else 0)
        return entries
    except struct.error:  # truncated: the decoder will say so
        return None


def inline_number(field: bytes, kind: int, order: str) -> int:
    formats = {TIFF_SHORT: "H", TIFF_LONG: "I", TIFF_LONG8: "Q"}
    if kind not in formats:
        return 0
    return struct.unpack_from(order + formats[kind], field)[0]
