import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import tokenize_text  # noqa: E402
from shards import HEADER_BYTES, check_shard, read_header, read_shard, write_shard  # noqa: E402

DOWNLOAD = ROOT / "data" / "cached_fineweb10B.py"
EOT = 50256

# -----------------------------------------------------------------------------
# Shard format


def test_shard_round_trip(tmp_path):
    path = tmp_path / "s.bin"
    tokens = np.array([0, 1, EOT, 65535, 7])
    write_shard(path, tokens)
    assert np.fromfile(path, dtype="<i4", count=4).tolist() == [20240520, 1, 5, 0]
    assert path.stat().st_size == HEADER_BYTES + 2 * 5
    assert read_header(path) == check_shard(path) == 5
    assert read_shard(path).tolist() == tokens.tolist()


@pytest.mark.parametrize("bad_id", [65536, -1])
def test_write_shard_refuses_ids_beyond_uint16(tmp_path, bad_id):
    with pytest.raises(ValueError, match=f"s.bin: token id {bad_id} does not fit in uint16"):
        write_shard(tmp_path / "s.bin", [1, bad_id])


def header_word(data: bytes, index: int, value: int) -> bytes:
    words = np.frombuffer(data, dtype="<i4").copy()
    words[index] = value
    return words.tobytes()


BAD_SHARDS = {  # how to spoil a good shard's bytes, and what the error must say
    "missing": (None, "no such shard"),
    "short": (lambda b: b[:100], "100 bytes is too short"),
    "magic": (lambda b: header_word(b, 0, 12345), "magic number 12345"),
    "version": (lambda b: header_word(b, 1, 2), "shard version 2"),
    "truncated": (lambda b: b[:-2], "does not match the header's 4 tokens"),
    "too long": (lambda b: b + b"\0\0", "does not match the header's 4 tokens"),
}


@pytest.mark.parametrize("case", BAD_SHARDS)
def test_bad_shard_is_named_with_its_fault(tmp_path, case):
    spoil, message = BAD_SHARDS[case]
    path = tmp_path / "bad_shard.bin"
    if spoil:
        write_shard(path, [1, 2, 3, 4])
        path.write_bytes(spoil(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as error:
        check_shard(path)
    assert str(path) in str(error.value)

# -----------------------------------------------------------------------------
# cached_fineweb10B.py against a local stand-in for the Hugging Face hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub(ThreadingHTTPServer):
    def __init__(self, repo: str, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repo, self.files, self.downloads = repo, files, Counter()
        self.url = f"http://127.0.0.1:{self.server_port}"


class HubHandler(BaseHTTPRequestHandler):
    # /datasets/{repo}/resolve/{revision}/{filename} with the headers hf_hub_download requires: X-Repo-Commit, ETag
    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body: bool):
        match = re.fullmatch(r"/datasets/(.+)/resolve/[^/]+/([^/]+)", self.path)
        data = self.server.files.get(match[2]) if match and match[1] == self.server.repo else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.server.downloads[match[2]] += 1
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    servers = []

    def start(files: dict[str, bytes], repo: str = "kjj0/fineweb10B-gpt2") -> Hub:
        server = Hub(repo, files)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def published_shards(tmp_path: Path, prefix: str, num_train: int) -> dict[str, bytes]:
    names = [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, num_train + 1)]
    files = {}
    for seed, name in enumerate(names):
        write_shard(tmp_path / name, np.random.default_rng(seed).integers(0, EOT + 1, size=1000))
        files[name] = (tmp_path / name).read_bytes()
    return files


def run_download(server: Hub, tmp_path: Path, *args, script: Path = DOWNLOAD) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_ENDPOINT when imported, hence a fresh process
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_download_fetches_valid_shards_once(hub, tmp_path):
    files = published_shards(tmp_path, "fineweb", 3)
    server, out = hub(files), tmp_path / "fw"
    wanted = ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]

    result = run_download(server, tmp_path, 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert all((out / name).read_bytes() == files[name] for name in wanted)
    assert not (out / "fineweb_train_000003.bin").exists()
    assert server.downloads == Counter(wanted)

    result = run_download(server, tmp_path, 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert server.downloads == Counter(wanted), "a second run must not download valid shards again"

    (out / wanted[1]).write_bytes(files[wanted[1]][:-10])
    result = run_download(server, tmp_path, 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert wanted[1] in result.stdout
    assert server.downloads == Counter(wanted + [wanted[1]]), "only the spoilt local shard is fetched again"
    assert (out / wanted[1]).read_bytes() == files[wanted[1]]


def test_download_deletes_and_names_a_corrupt_shard(hub, tmp_path):
    files = published_shards(tmp_path, "fineweb", 2)
    files["fineweb_train_000002.bin"] = files["fineweb_train_000002.bin"][:-1000]
    server, out = hub(files), tmp_path / "fw"
    result = run_download(server, tmp_path, 2, "--out", out)
    assert result.returncode == 1
    assert "fineweb_train_000002.bin" in result.stderr and "does not match" in result.stderr
    assert sorted(p.name for p in out.glob("*.bin")) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert not list(out.rglob("*.incomplete"))


def test_download_more_shards_than_published_is_a_clear_error(hub, tmp_path):
    server = hub(published_shards(tmp_path, "fineweb", 2))
    result = run_download(server, tmp_path, 3, "--out", tmp_path / "fw")
    assert result.returncode == 1
    assert "fineweb_train_000003.bin is not in the dataset kjj0/fineweb10B-gpt2" in result.stderr

    downloads = sum(server.downloads.values())
    result = run_download(server, tmp_path, 104, "--out", tmp_path / "fw")
    assert result.returncode == 2
    assert "10B has 0 to 103 train shards" in result.stderr
    assert sum(server.downloads.values()) == downloads


@pytest.mark.parametrize("out", ["/proc/x/fw", "file"])
def test_download_names_an_out_it_cannot_make(tmp_path, out):
    # refused before any download, not a FileNotFoundError or FileExistsError traceback
    (tmp_path / "file").write_text("not a folder")
    r = subprocess.run([sys.executable, str(DOWNLOAD), "1", "--out", str(tmp_path / out)], cwd=tmp_path,
                       env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stdout == "", r.stderr
    assert r.stderr.startswith(f"cached_fineweb10B.py: error: --out {tmp_path / out}: cannot create it"), r.stderr


def test_download_edu_variant_lands_beside_the_script_from_any_cwd(hub, tmp_path):
    repo_data = tmp_path / "repo" / "data"
    repo_data.mkdir(parents=True)
    for name in ("cached_fineweb10B.py", "shards.py"):
        shutil.copy(ROOT / "data" / name, repo_data)
    files = published_shards(tmp_path, "finewebedu", 1)
    server = hub(files, repo="kjj0/finewebedu10B-gpt2")
    result = run_download(server, tmp_path, 1, "--variant", "edu10B", script=repo_data / "cached_fineweb10B.py")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (repo_data / "finewebedu10B").glob("*.bin")) == sorted(files)

# -----------------------------------------------------------------------------
# tokenize_text.py

DOCS = ["Hello world", "Über straße: naïve café, 東京 🙂\n\nSecond paragraph.\n"] + [
    f"Document {i} says: {'la ' * i}and a literal <|endoftext|> stays text." for i in range(40)]


def byte_symbols() -> list[str]:
    # GPT-2's data-gym alphabet (openai/gpt-2 encoder.py bytes_to_unicode): printable bytes stand for themselves,
    # the others for chr(256 + n) in byte order; token ids follow this order
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    symbol = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return [symbol[b] for b in printable + others]


# a few merges in GPT-2's notation (Ġ is the space) that turn "Hello world" into two tokens
MERGES = [("H", "e"), ("l", "l"), ("He", "ll"), ("Hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d"),
          ("Ġwor", "ld")]


@pytest.fixture
def small_bpe(tmp_path, monkeypatch) -> dict:
    # vocab.bpe and encoder.json in GPT-2's format with 256 byte tokens and MERGES, accepted as if they were GPT-2's
    bpe_dir = tmp_path / "bpe"
    bpe_dir.mkdir()
    encoder = {symbol: i for i, symbol in enumerate(byte_symbols())}
    encoder |= {a + b: 256 + i for i, (a, b) in enumerate(MERGES)}
    vocab_bpe = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    (bpe_dir / "vocab.bpe").write_text(vocab_bpe, encoding="utf-8")
    (bpe_dir / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    for name, constant in (("vocab.bpe", "VOCAB_BPE_SHA256"), ("encoder.json", "ENCODER_JSON_SHA256")):
        monkeypatch.setattr(tokenize_text, constant, hashlib.sha256((bpe_dir / name).read_bytes()).hexdigest())
    return dict(dir=bpe_dir, encoder=encoder)


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (root / "sub" / "b.txt").write_text(DOCS[1], encoding="utf-8")
    lines = [json.dumps({"id": i, "text": doc}) for i, doc in enumerate(DOCS[2:])]
    (root / "docs.jsonl").write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n", encoding="utf-8")
    return root


def tokenize(bpe_dir: Path, *args) -> int:
    return tokenize_text.main([str(arg) for arg in (*args, "--bpe-dir", bpe_dir)])


def split_documents(out: Path, split: str, bpe_dir: Path) -> tuple[list[str], list[int]]:
    shards = sorted(out.glob(f"text_{split}_*.bin"))
    stream = np.concatenate([read_shard(path) for path in shards]) if shards else np.zeros(0, dtype=np.uint16)
    assert len(stream) == 0 or stream[0] == EOT, "every document starts with <|endoftext|>"
    starts = np.flatnonzero(stream == EOT).tolist() + [len(stream)]
    encoding = tokenize_text.gpt2_encoding(bpe_dir)
    docs = [encoding.decode(stream[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
    return docs, [check_shard(path) for path in shards]


def test_encoding_from_bpe_files_applies_the_merges(small_bpe):
    encoding = tokenize_text.gpt2_encoding(small_bpe["dir"])
    assert encoding.encode("Hello world") == [small_bpe["encoder"]["Hello"], small_bpe["encoder"]["Ġworld"]]
    assert encoding.encode_ordinary("\x00 é") == [small_bpe["encoder"][s] for s in ("Ā", "Ġ", "Ã", "©")]
    assert encoding.decode(encoding.encode(DOCS[1])) == DOCS[1]
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [EOT]


def test_bpe_files_other_than_gpt2s_are_refused(small_bpe, monkeypatch):
    monkeypatch.undo()  # the real GPT-2 hashes
    with pytest.raises(tokenize_text.InputError, match="does not hold GPT-2's own BPE files"):
        tokenize_text.gpt2_encoding(small_bpe["dir"])
    (small_bpe["dir"] / "encoder.json").unlink()
    with pytest.raises(tokenize_text.InputError, match="has no encoder.json"):
        tokenize_text.gpt2_encoding(small_bpe["dir"])


def test_tokenize_splits_by_document_into_bounded_shards(corpus, small_bpe, tmp_path):
    out, bpe_dir = tmp_path / "tokens", small_bpe["dir"]
    assert tokenize(bpe_dir, corpus / "a.txt", corpus / "sub", f"{corpus}/*.jsonl", "--out", out, "--val-docs", 5,
                    "--shard-tokens", 200) == 0
    val, val_sizes = split_documents(out, "val", bpe_dir)
    train, train_sizes = split_documents(out, "train", bpe_dir)
    assert len(val) == 5 and not set(val) & set(train)
    assert sorted(val + train) == sorted(DOCS)
    for sizes in (val_sizes, train_sizes):
        assert all(size == 200 for size in sizes[:-1]) and 0 < sizes[-1] <= 200
    assert len(train_sizes) > 3
    assert (out / "text_val_000000.bin").exists() and (out / "text_train_000001.bin").exists()


def test_tokenize_val_choice_follows_the_seed(corpus, small_bpe, tmp_path):
    bpe_dir = small_bpe["dir"]
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        assert tokenize(bpe_dir, corpus, "--out", tmp_path / name, "--seed", seed, "--val-fraction", 0.1) == 0
    val = {name: split_documents(tmp_path / name, "val", bpe_dir)[0] for name in "ac"}
    assert len(val["a"]) == 5  # 10% of 42 documents, rounded up
    val_a, val_b = (tmp_path / name / "text_val_000000.bin" for name in "ab")
    assert val_a.read_bytes() == val_b.read_bytes()
    assert val["a"] != val["c"]


@pytest.mark.parametrize("case", ["no text field", "no such input", "no such file", "wrong file type",
                                  "shards already there", "all val", "no bpe dir", "out cannot be made",
                                  "out is a file", "prefix with a folder"])
def test_tokenize_input_errors_are_named(corpus, small_bpe, tmp_path, capsys, case):
    out = tmp_path / "tokens"
    (tmp_path / "notes.md").write_text("a document", encoding="utf-8")
    args, message = {
        "no text field": ([corpus / "docs.jsonl", "--text-field", "body"], "docs.jsonl:1 has no string field 'body'"),
        "no such input": ([corpus / "nope*.txt"], "nope*.txt matches no .txt or .jsonl file"),
        "no such file": ([corpus / "nope.txt"], "nope.txt matches no .txt or .jsonl file"),
        "wrong file type": ([tmp_path / "notes.md"], "notes.md is neither .txt (one document) nor .jsonl"),
        "shards already there": ([corpus], "already holds text_train_000001.bin"),
        "all val": ([corpus / "a.txt", "--val-docs", 1], "1 val documents out of 1 leave none to train on"),
        "no bpe dir": ([corpus, "--bpe-dir", tmp_path / "nope"], "--bpe-dir {tmp}/nope has no vocab.bpe"),
        # /proc takes no new folders: before, this crashed with a traceback after tokenizing everything
        "out cannot be made": ([corpus, "--out", "/proc/x/tokens"], "--out /proc/x/tokens: cannot create or write it"),
        "out is a file": ([corpus, "--out", tmp_path / "notes.md"], "--out {tmp}/notes.md: cannot create or write it"),
        # this crashed too, after tokenizing: the shards' names held a folder that nothing made
        "prefix with a folder": ([corpus, "--prefix", "a/b"], "--prefix a/b is not a file name; put folders in --out"),
    }[case]
    if case == "shards already there":
        out.mkdir()
        write_shard(out / "text_train_000001.bin", [EOT])
    # bad input exits 2, with one error line (argparse takes the last --bpe-dir and --out)
    argv = [str(arg) for arg in ("--out", out, "--bpe-dir", small_bpe["dir"], *args)]
    assert tokenize_text.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenize_text.py: error: ") and len(err.splitlines()) == 1, err
    assert message.format(tmp=tmp_path) in err, err
    if case != "shards already there":
        assert not out.exists()


def test_tokenize_cli_exits_2_for_a_missing_input(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "data" / "tokenize_text.py"), str(tmp_path / "nope.txt"),
                        "--out", str(tmp_path / "tokens")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("tokenize_text.py: error: ") and \
        len(r.stderr.splitlines()) == 1, r.stderr


def test_tokenize_reads_files_that_start_with_a_byte_order_mark(small_bpe, tmp_path):
    # editors write EF BB BF at the start of UTF-8 files; it is not part of the first document's text
    root = tmp_path / "bom"
    root.mkdir()
    (root / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": d}) for d in DOCS[:3]).encode())
    (root / "b.txt").write_bytes(b"\xef\xbb\xbf" + DOCS[3].encode())
    out = tmp_path / "tokens"
    bpe_dir = small_bpe["dir"]
    assert tokenize(bpe_dir, root, "--out", out, "--val-docs", 1) == 0
    val, _ = split_documents(out, "val", bpe_dir)
    train, _ = split_documents(out, "train", bpe_dir)
    assert sorted(val + train) == sorted(DOCS[:4])


def test_tokenize_skips_blank_documents_everywhere(small_bpe, tmp_path, capsys):
    # whitespace-only texts (a no-break space, a tab) and a line holding only a no-break space are no documents:
    # counted nowhere, so --val-docs 1 gives exactly one val document
    root = tmp_path / "blank"
    root.mkdir()
    lines = [json.dumps({"text": "\u00a0"}), "\u00a0", json.dumps({"text": DOCS[0]}), json.dumps({"text": " \t\n"}),
             json.dumps({"text": DOCS[2]})]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "b.txt").write_text("\u3000\n", encoding="utf-8")  # an ideographic space
    out = tmp_path / "tokens"
    bpe_dir = small_bpe["dir"]
    assert tokenize(bpe_dir, root, "--out", out, "--val-docs", 1) == 0
    val, _ = split_documents(out, "val", bpe_dir)
    train, _ = split_documents(out, "train", bpe_dir)
    assert len(val) == 1 and sorted(val + train) == sorted([DOCS[0], DOCS[2]])
    assert "val: 1 documents" in capsys.readouterr().out
    # two real documents cannot spare two for validation
    assert tokenize(bpe_dir, root, "--out", tmp_path / "again", "--val-docs", 2) == 2
    assert "2 val documents out of 2 leave none to train on" in capsys.readouterr().err


@pytest.mark.parametrize("args, rc", [(["--help"], 0), ([], 0), (["x.bin"], 2)])
def test_running_the_shard_helpers_says_what_to_run_instead(args, rc):
    # before, `python3 data/shards.py --help` printed nothing and exited 0
    r = subprocess.run([sys.executable, str(ROOT / "data" / "shards.py"), *args], capture_output=True, text=True,
                       timeout=60)
    out = r.stdout if rc == 0 else r.stderr
    assert r.returncode == rc and len(out.splitlines()) == 1, (r.stdout, r.stderr)
    assert out.startswith("shards.py: error:" if rc else "shards.py: the shard-format helpers"), out
    assert "data/tokenize_text.py" in out and "data/cached_fineweb10B.py" in out
