"""The start-up check of the image files a reader will decode without `byol convert` having seen them (the DALI
backend over a plain folder): cheap reads of each file's first and last bytes, threaded and in chunks."""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

# Leading bytes of the formats DALI decodes (JPEG, PNG, BMP, TIFF, WebP at offset 8, PNM, JPEG 2000).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"P1", b"P2", b"P3", b"P4",
               b"P5", b"P6", b"\x00\x00\x00\x0cjP  ", b"\xffO\xffQ")
_TAIL = 1024  # a complete JPEG / PNG ends with its end marker within this many bytes
CHECK_CHUNK = 2048  # paths per task of the start-up file check


def jpeg_reaches_its_end(data: bytes) -> bool:
    """Whether a JPEG's image data runs to its end marker (EOI), whatever follows it (phones append videos or
    metadata). Walks the segments by their lengths (an EXIF thumbnail's own EOI sits inside one), then scans each
    scan's entropy-coded data, where 0xFF is always followed by 0x00, a restart marker or the next marker."""
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return False
        m = data[i + 1]
        if m == 0xFF:                      # fill byte before a marker
            i += 1
        elif m == 0xD9:
            return True
        elif 0xD0 <= m <= 0xD7 or m == 0x01:   # markers without a length
            i += 2
        elif i + 3 >= n:
            return False
        elif m != 0xDA:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        else:                              # start of scan: skip its header, then its entropy-coded data
            j = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
            while True:
                k = data.find(b"\xff", j)
                if k < 0 or k + 1 >= n:
                    return False
                x = data[k + 1]
                if x == 0x00 or 0xD0 <= x <= 0xD7 or x == 0xFF:
                    j = k + (1 if x == 0xFF else 2)
                    continue
                i = k                      # a marker: the next table, scan, or the end
                break
    return False


def image_file_problem(path: str) -> str:
    """Cheap check of one image file: why DALI could not read it ("" if it looks fine): empty, not a known image
    signature, a JPEG/PNG cut short (no end marker), or unreadable. A JPEG whose last bytes hold no end marker is
    read whole and parsed (`jpeg_reaches_its_end`): data appended after a complete image is not damage."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if not head:
                return "empty file"
            if head[8:12] == b"WEBP" and head[:4] == b"RIFF":
                return ""
            if not head.startswith(_SIGNATURES):
                return "not an image (unknown signature)"
            if head.startswith((b"\xff\xd8\xff", b"\x89PNG")):
                size = f.seek(0, 2)
                f.seek(max(0, size - _TAIL))
                marker = b"\xff\xd9" if head[0] == 0xFF else b"IEND"
                if marker in f.read(_TAIL):
                    return ""
                if head[0] == 0xFF:   # rare: read it whole
                    f.seek(0)
                    if jpeg_reaches_its_end(f.read()):
                        return ""
                return "cut short (no end marker)"
            return ""
    except OSError as e:
        return f"unreadable ({e.strerror or e})"


def image_file_ok(path: str) -> bool:
    """`image_file_problem` found nothing."""
    return not image_file_problem(path)


def check_image_files(paths: list[str], threads: int = 16, chunk: int = CHECK_CHUNK) -> list[str]:
    """`image_file_problem` of every path, in order (threaded: the cost is file opens, not CPU).

    The paths go to the threads in chunks of up to `chunk`, at most two chunks per thread in flight, so memory stays
    flat whatever the number of files (ImageNet has 1.28 M): one future per path, all submitted up front
    (`ThreadPoolExecutor.map`), would hold every path's future and result at once.
    """
    size = max(1, min(chunk, -(-len(paths) // threads)))  # small folders still spread over every thread
    problems: list[str] = []
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(paths), size):
            if len(pending) == 2 * threads:
                problems.extend(pending.popleft().result())
            pending.append(pool.submit(_check_chunk, paths[start:start + size]))
        while pending:
            problems.extend(pending.popleft().result())
    return problems


def _check_chunk(paths: list[str]) -> list[str]:
    return [image_file_problem(p) for p in paths]
