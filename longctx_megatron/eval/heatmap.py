"""A length x depth heatmap as a PNG, written with zlib alone (no plotting library needed).

Columns are context lengths (short to long, left to right), rows are depths (0 at the top), and
each cell's colour runs from red (accuracy 0) through yellow to green (accuracy 1); a cell with no
result is grey. The figure has no text: the table printed next to it and the JSON hold the numbers.
"""

from __future__ import annotations

import struct
import zlib

from longctx_megatron.atomic_file import atomic_write

CELL = 32  # pixels per cell side
GAP = 2  # pixels between cells


def _colour(value: float | None) -> tuple[int, int, int]:
    if value is None:
        return (160, 160, 160)
    value = min(1.0, max(0.0, value))
    if value < 0.5:  # red -> yellow
        return (220, int(40 + 360 * value), 40)
    return (int(220 - 360 * (value - 0.5)), 220, 40)  # yellow -> green


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def heatmap_png(values: list[list[float | None]]) -> bytes:
    """PNG bytes of ``values[row][column]`` in [0, 1] (None: no result)."""
    rows, columns = len(values), max(len(row) for row in values)
    width, height = columns * (CELL + GAP) + GAP, rows * (CELL + GAP) + GAP
    background = (255, 255, 255)
    lines = []
    for y in range(height):
        row, inside_y = divmod(y - GAP, CELL + GAP)
        pixels = bytearray(b"\x00")  # filter type 0 for this scanline
        for x in range(width):
            column, inside_x = divmod(x - GAP, CELL + GAP)
            in_cell = y >= GAP and x >= GAP and inside_y < CELL and inside_x < CELL and row < rows
            colour = _colour(values[row][column] if column < len(values[row]) else None) if in_cell else background
            pixels.extend(colour)
        lines.append(bytes(pixels))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(lines), 9))
            + _chunk(b"IEND", b""))


def write_heatmap(path: str, values: list[list[float | None]]) -> None:
    with atomic_write(path, "wb", encoding=None) as file:
        file.write(heatmap_png(values))
