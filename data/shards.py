"""Token shards in the modded-nanogpt / llm.c format: 256 int32 header words, then uint16 tokens.

Header: [MAGIC, VERSION, number of tokens, 253 zeros], little-endian.
"""
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_BYTES = 256 * 4
MAX_TOKEN = np.iinfo(np.uint16).max


def write_shard(path: str | Path, tokens) -> None:
    tokens = np.asarray(tokens)
    bad = tokens[(tokens < 0) | (tokens > MAX_TOKEN)]
    if bad.size:
        raise ValueError(f"{path}: token id {bad[0]} does not fit in uint16 (0..{MAX_TOKEN}); "
                         f"shards hold vocabularies of at most {MAX_TOKEN + 1} tokens, like GPT-2's")
    header = np.zeros(256, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_header(path: str | Path) -> int:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such shard")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for the {HEADER_BYTES}-byte shard header")
    magic, version, ntokens = np.frombuffer(raw, dtype="<i4")[:3]
    if magic != MAGIC:
        raise ValueError(f"{path}: magic number {magic} is not {MAGIC}, so this is not a token shard")
    if version != VERSION:
        raise ValueError(f"{path}: shard version {version} is not the supported version {VERSION}")
    return int(ntokens)


def check_shard(path: str | Path) -> int:
    ntokens = read_header(path)
    size, expected = Path(path).stat().st_size, HEADER_BYTES + 2 * ntokens
    if size != expected:
        raise ValueError(f"{path}: size {size} bytes does not match the header's {ntokens} tokens "
                         f"({expected} bytes); the file is truncated or corrupt")
    return ntokens


def read_shard(path: str | Path) -> np.ndarray:
    check_shard(path)
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)


if __name__ == "__main__":  # a module of helpers, not a script: say so instead of silently doing nothing
    import sys
    about = ("the shard-format helpers that data/tokenize_text.py and data/cached_fineweb10B.py import, not a script; "
             "to make shards run data/tokenize_text.py (your own text) or data/cached_fineweb10B.py (FineWeb), "
             "each with --help")
    if sys.argv[1:] in ([], ["-h"], ["--help"]):
        print(f"shards.py: {about}")
        sys.exit(0)
    print(f"shards.py: error: takes no arguments (got {sys.argv[1]!r}): {about}", file=sys.stderr)
    sys.exit(2)
