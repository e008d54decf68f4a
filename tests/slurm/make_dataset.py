"""Writes a small PNG dataset in fcd eval's layout (one folder per case) at the fixture
model's 32 x 32: lesion cases with a mask, healthy cases, and one case without its T1w (a bad
case). Standard library only, so that the Slurm test needs no packages.

    python3 make_dataset.py DIR [LESION_CASES] [HEALTHY_CASES]
"""

import math
import struct
import sys
import zlib
from pathlib import Path

SIZE = 32


def png(path, values):
    """An 8-bit greyscale PNG of SIZE x SIZE values (row-major, clipped to 0..255)."""
    rows = b"".join(
        b"\x00" + bytes(max(0, min(255, round(v))) for v in values[y * SIZE : (y + 1) * SIZE])
        for y in range(SIZE)
    )

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", SIZE, SIZE, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def image(f):
    """f(x, y) inside a disc, 0 outside: a skull-stripped-looking slice."""
    c = SIZE / 2
    return [
        f(x, y) if math.hypot(x - c, y - c) <= 0.45 * SIZE else 0.0
        for y in range(SIZE)
        for x in range(SIZE)
    ]


def main():
    out = Path(sys.argv[1])
    lesions = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    healthy = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    t1 = image(lambda x, y: 80 + 30 * math.cos(x / 6 + y / 9))
    for i in range(lesions):
        at = (10 + 5 * i % 13, 12 + 3 * i % 9)
        inside = lambda x, y: math.hypot(x - at[0], y - at[1]) <= 4
        case = out / f"p{i:02d}"
        png(case / f"p{i:02d}_T1w.png", t1)
        png(
            case / f"p{i:02d}_FLAIR.png",
            image(lambda x, y: 90 + 40 * math.sin(x / 5) * math.cos(y / 7) + 100 * inside(x, y)),
        )
        png(case / f"p{i:02d}_FLAIR_roi.png", image(lambda x, y: 255 * inside(x, y)))
    for i in range(healthy):
        case = out / f"h{i:02d}"
        png(case / f"h{i:02d}_T1w.png", t1)
        png(
            case / f"h{i:02d}_FLAIR.png",
            image(lambda x, y: 90 + 40 * math.sin(x / 5 + i) * math.cos(y / 7)),
        )
    png(out / "nomod" / "nomod_FLAIR.png", t1)


main()
