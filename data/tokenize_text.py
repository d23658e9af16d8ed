#!/usr/bin/env python3
"""Tokenize your own text with GPT-2's BPE into shards that train_gpt.py reads like FineWeb's.

    python data/tokenize_text.py notes/ papers.jsonl "books/*.txt" --prefix mine
    TRAIN_FILES="data/tokens/mine_train_*.bin" VAL_FILES="data/tokens/mine_val_*.bin" python train_gpt.py

A .txt file is one document; a .jsonl file holds one document per line, in the field --text-field.
Documents of only whitespace are skipped; a UTF-8 byte-order mark at a file's start is dropped.
Every document starts with <|endoftext|> (50256), as in the FineWeb shards, and goes whole to val or train.
"""
import argparse
import glob
import json
import math
import sys
import uuid
from itertools import islice
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
from tqdm import tqdm

from shards import write_shard

DATA_DIR = Path(__file__).resolve().parent
SUFFIXES = (".txt", ".jsonl")
EOT = 50256
# GPT-2's pre-tokenizer split, from openai/gpt-2 src/encoder.py
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# sha256 of GPT-2's vocab.bpe and encoder.json, so other BPE files are refused rather than silently used
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
BATCH_DOCS = 512  # documents per tiktoken call, which encodes a batch on several threads
BPE_HINT = "pass --bpe-dir with a folder holding vocab.bpe and encoder.json"


class InputError(Exception):  # bad input: exit 2
    pass


class FetchError(InputError):  # the download failed, not the input: exit 1
    pass


def gpt2_encoding(bpe_dir: Path | None, hint: str = BPE_HINT) -> tiktoken.Encoding:
    if bpe_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except OSError as error:
            raise FetchError(f"could not fetch the GPT-2 tokenizer ({error}); {hint}") from error
    vocab_bpe, encoder_json = bpe_dir / "vocab.bpe", bpe_dir / "encoder.json"
    for path in (vocab_bpe, encoder_json):
        if not path.is_file():
            raise InputError(f"--bpe-dir {bpe_dir} has no {path.name}; it needs GPT-2's vocab.bpe and encoder.json")
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json),
            vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    except ValueError as error:
        raise InputError(f"--bpe-dir {bpe_dir} does not hold GPT-2's own BPE files ({error})") from error
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT})


def input_files(inputs: list[str]) -> list[Path]:
    files = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not found:
            raise InputError(f"{spec} matches no .txt or .jsonl file; give files, folders or a quoted glob")
        for p in found:
            if p.suffix not in SUFFIXES:
                raise InputError(f"{p} is neither .txt (one document) nor .jsonl (one document a line)")
        files += found
    return list(dict.fromkeys(files))


def check_writable(out: Path) -> None:
    # an --out that cannot be made or written is refused before tokenizing, not when the first shard is written;
    # the folders and the file made to find out are removed again
    made = [p for p in (out, *out.parents) if not p.exists()]
    probe = out / f".write_test.{uuid.uuid4().hex[:8]}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise InputError(f"--out {out}: cannot create or write it ({error.strerror or error}); "
                         f"give --out a folder you can write to") from None
    finally:
        for p in made:
            try:
                p.rmdir()
            except OSError:
                pass


def count_documents(files: list[Path], text_field: str) -> int:
    # the same reader as the tokenizing pass, so both agree on what is a document
    return sum(1 for _ in read_documents(files, text_field))


def read_documents(files: list[Path], text_field: str):
    # utf-8-sig drops the byte-order mark editors write at a file's start; a text of only whitespace (any
    # Unicode space, as str.strip sees it) is no document
    for path in files:
        try:
            if path.suffix == ".txt":
                text = path.read_text(encoding="utf-8-sig")
                if text.strip():
                    yield text
                continue
            with open(path, encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip() and (text := jsonl_text(line, text_field, f"{path}:{lineno}")).strip():
                        yield text
        except UnicodeDecodeError as error:
            raise InputError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                             f"convert it to UTF-8") from error


def jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{where} is not valid JSON ({error.msg}); a .jsonl file holds one JSON object a line") \
            from error
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise InputError(f"{where} has no string field '{text_field}'; name the text's field with --text-field")
    return record[text_field]


class ShardWriter:
    # cuts one split's token stream into shards of exactly shard_tokens tokens, the last one shorter
    def __init__(self, out: Path, prefix: str, split: str, first_index: int, shard_tokens: int):
        self.out, self.prefix, self.split, self.index = out, prefix, split, first_index
        self.shard_tokens = shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = self.docs = self.tokens = 0
        self.paths: list[Path] = []

    def add(self, doc: np.ndarray) -> None:
        self.pending.append(doc)
        self.pending_tokens += len(doc)
        self.docs += 1
        self.tokens += len(doc)
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self.write(stream[:self.shard_tokens])
            self.pending = [stream[self.shard_tokens:]]
            self.pending_tokens = len(self.pending[0])

    def close(self) -> None:
        if self.pending_tokens:
            self.write(np.concatenate(self.pending))

    def write(self, tokens: np.ndarray) -> None:
        path = self.out / f"{self.prefix}_{self.split}_{self.index:06d}.bin"
        write_shard(path, tokens)
        self.paths.append(path)
        self.index += 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help=".txt and .jsonl files, folders holding them, or globs")
    parser.add_argument("--out", type=Path, default=DATA_DIR / "tokens",
                        help="folder for the shards (default data/tokens in this repo)")
    parser.add_argument("--prefix", default="text", help="shard names start with this (default text)")
    parser.add_argument("--text-field", default="text",
                        help="field of each .jsonl line that holds the text (default text)")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.01,
                     help="share of the documents held out for validation, rounded up (default 0.01)")
    val.add_argument("--val-docs", type=int, help="number of documents held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of val documents (default 0)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000,
                        help="tokens per shard, as FineWeb's (default 100000000)")
    parser.add_argument("--bpe-dir", type=Path,
                        help="folder with GPT-2's vocab.bpe and encoder.json, to work offline "
                             "(default: tiktoken downloads them)")
    parser.add_argument("--bpe-hint", default=BPE_HINT, help=argparse.SUPPRESS)  # run.sh names its BPE_DIR instead
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction {args.val_fraction} must be at least 0 and below 1")
    if args.val_docs is not None and args.val_docs < 0:
        parser.error(f"--val-docs {args.val_docs} must be 0 or more")
    if args.shard_tokens < 1:
        parser.error(f"--shard-tokens {args.shard_tokens} must be positive")
    try:
        if Path(args.prefix).name != args.prefix:  # the shards would go to a folder that --out does not make
            raise InputError(f"--prefix {args.prefix} is not a file name; put folders in --out "
                             f"(--out {args.out / Path(args.prefix).parent} --prefix {Path(args.prefix).name})")
        files = input_files(args.inputs)
        check_writable(args.out)
        stale = sorted(args.out.glob(f"{args.prefix}_*.bin"))
        if stale:
            raise InputError(f"{args.out} already holds {stale[0].name} and {len(stale) - 1} more "
                             f"'{args.prefix}_*.bin' shards; delete them or choose another --prefix or --out")
        encoding = gpt2_encoding(args.bpe_dir, args.bpe_hint)  # a bad --bpe-dir is refused before reading all the text
        num_docs = count_documents(files, args.text_field)
        num_val = args.val_docs if args.val_docs is not None else math.ceil(args.val_fraction * num_docs)
        if not 0 <= num_val < num_docs:
            raise InputError(f"{num_val} val documents out of {num_docs} leave none to train on; "
                             f"give more text or a smaller --val-docs or --val-fraction")
        val_docs = set(np.random.default_rng(args.seed).choice(num_docs, size=num_val, replace=False).tolist())
        args.out.mkdir(parents=True, exist_ok=True)
        writers = {"val": ShardWriter(args.out, args.prefix, "val", 0, args.shard_tokens),
                   "train": ShardWriter(args.out, args.prefix, "train", 1, args.shard_tokens)}
        docs = enumerate(read_documents(files, args.text_field))
        with tqdm(total=num_docs, unit="doc", desc="tokenizing") as bar:
            while batch := list(islice(docs, BATCH_DOCS)):
                # encode_ordinary: an "<|endoftext|>" written in the text stays text, not a document break
                for (index, _), tokens in zip(batch, encoding.encode_ordinary_batch([text for _, text in batch])):
                    writers["val" if index in val_docs else "train"].add(np.array([EOT, *tokens], dtype=np.uint16))
                bar.update(len(batch))
        for writer in writers.values():
            writer.close()
        assert writers["val"].docs == num_val, "the counting and tokenizing passes disagree on the documents"
    except InputError as error:
        print(f"tokenize_text.py: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, FetchError) else 2
    for split, writer in writers.items():
        print(f"{split}: {writer.docs} documents, {writer.tokens:,} tokens -> {len(writer.paths)} shards "
              f"{args.out / f'{args.prefix}_{split}_*.bin'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
