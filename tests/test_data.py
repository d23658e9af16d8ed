import numpy as np
import pytest
import torch

import train_gpt
from train_gpt import DataError, DataLoader, check_shard, find_shards, read_shard
from conftest import write_shard

CPU = torch.device("cpu")


def header(magic=20240520, version=1, count=0) -> bytes:
    h = np.zeros(256, dtype="<i4")
    h[:3] = (magic, version, count)
    return h.tobytes()


def counting_shards(folder, lengths, stride=100_000):
    # shard i holds i * stride, i * stride + 1, ... (mod 2^16), so every token says where it came from
    return [write_shard(folder / f"s_{i:03d}.bin", (i * stride + np.arange(n)) % 65536) for i, n in enumerate(lengths)]


def batches(loader, steps):
    return [[(x.clone(), y.clone()) for x, y in loader.next_batch()] for _ in range(steps)]


def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 32768, 7] * 50)
    path = write_shard(tmp_path / "a.bin", tokens)
    assert check_shard(path) == len(tokens)
    out = read_shard(path)
    assert out.dtype == torch.int32
    assert out.tolist() == tokens.tolist()


@pytest.mark.parametrize("case", ["missing", "short", "magic", "version", "size_long", "size_truncated"])
def test_bad_shard_raises_data_error_naming_the_file(tmp_path, case):
    path = tmp_path / f"bad_{case}.bin"
    body = np.arange(100, dtype="<u2").tobytes()
    contents = {"short": b"\x00" * 1000,
                "magic": header(magic=1234, count=100) + body,
                "version": header(version=2, count=100) + body,
                "size_long": header(count=100) + body + b"\x00\x00",
                "size_truncated": header(count=100) + body[:-2]}
    if case != "missing":
        path.write_bytes(contents[case])
    for fn in (check_shard, read_shard):
        with pytest.raises(DataError, match=str(path)):
            fn(path)


def test_find_shards_sorted_and_checked(tmp_path):
    for name in ("x_train_002.bin", "x_train_000.bin", "x_train_001.bin"):
        write_shard(tmp_path / name, np.arange(10))
    found = find_shards(str(tmp_path / "x_train_*.bin"), "TRAIN_FILES")
    assert [f.name for f in found] == ["x_train_000.bin", "x_train_001.bin", "x_train_002.bin"]
    (tmp_path / "x_train_001.bin").write_bytes(header(count=10))  # header without its tokens
    with pytest.raises(DataError, match="x_train_001.bin"):
        find_shards(str(tmp_path / "x_train_*.bin"), "TRAIN_FILES")


def test_find_shards_no_match_says_how_to_download(tmp_path):
    with pytest.raises(DataError) as e:
        find_shards(str(tmp_path / "nothing_*.bin"), "VAL_FILES")
    assert "VAL_FILES" in str(e.value) and "cached_fineweb10B.py" in str(e.value)


def test_relative_pattern_falls_back_to_the_repo(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "shards").mkdir(parents=True)
    write_shard(repo / "shards" / "r_000.bin", np.arange(10))
    monkeypatch.setattr(train_gpt, "REPO", repo)
    monkeypatch.chdir(tmp_path)  # the cwd has no shards/ folder
    assert find_shards("shards/r_*.bin", "TRAIN_FILES") == [repo / "shards" / "r_000.bin"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_share_the_single_process_batch(tmp_path, world_size):
    files = counting_shards(tmp_path, [5000])
    seq_len, batch_tokens = 128, 1024
    single = batches(DataLoader(files, batch_tokens, seq_len, 0, 1, CPU), 3)
    per_rank = [batches(DataLoader(files, batch_tokens, seq_len, r, world_size, CPU), 3) for r in range(world_size)]
    for step in range(3):
        assert len(single[step]) == batch_tokens // seq_len
        assert all(len(per_rank[r][step]) == batch_tokens // (seq_len * world_size) for r in range(world_size))
        # the same tokens per step for any GPU count: the ranks' micro-steps together are the single batch
        as_set = lambda pairs: sorted((tuple(x.tolist()), tuple(y.tolist())) for x, y in pairs)
        assert as_set(single[step]) == as_set(pair for r in range(world_size) for pair in per_rank[r][step])


def test_inputs_and_targets_follow_the_stream(tmp_path):
    files = counting_shards(tmp_path, [5000])
    loader = DataLoader(files, 512, 128, 0, 1, CPU)
    expected = 0
    for _ in range(3):
        for x, y in loader.next_batch():
            assert x.tolist() == list(range(expected, expected + 128))
            assert y.tolist() == list(range(expected + 1, expected + 129))  # targets: inputs shifted by one
            assert y.dtype == torch.int64
            expected += 128


def test_shard_tail_is_skipped_and_the_stream_wraps(tmp_path):
    # shard 0 fills two batches of 1024 and leaves a 452-token tail; shard 1 holds exactly 2 x 1024 tokens, which
    # fill only one batch: the last target of a batch is the token after it
    files = counting_shards(tmp_path, [2500, 2048])
    log = []
    loader = DataLoader(files, 1024, 256, 0, 1, CPU, log=log.append)
    firsts = []
    for _ in range(5):
        batch = loader.next_batch()
        assert all(len(x) == len(y) == 256 for x, y in batch)
        firsts.append(batch[0][0][0].item())
        if len(firsts) == 3:
            assert log == []
    assert firsts == [0, 1024, 100_000 % 65536, 0, 1024]
    assert len(log) == 1 and "starting over" in log[0]


def test_shard_smaller_than_a_batch_is_an_error(tmp_path):
    files = counting_shards(tmp_path, [2000, 1000])
    loader = DataLoader(files, 1024, 256, 0, 1, CPU)
    loader.next_batch()
    with pytest.raises(DataError, match="s_001.bin"):
        loader.next_batch()


@pytest.mark.parametrize("taken", [1, 2, 3])  # resume mid-shard, right before and right after a shard switch
def test_state_dict_resumes_the_same_stream(tmp_path, taken):
    files = counting_shards(tmp_path, [2500, 2500])
    first = DataLoader(files, 1024, 256, 1, 2, CPU)
    batches(first, taken)
    state = first.state_dict()
    expected = batches(first, 3)
    resumed = DataLoader(files, 1024, 256, 1, 2, CPU)
    resumed.load_state_dict(state)
    for a, b in zip(expected, batches(resumed, 3)):
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_rewind_restarts_from_the_first_shard(tmp_path):
    files = counting_shards(tmp_path, [1100, 1100])
    loader = DataLoader(files, 1024, 1024, 0, 1, CPU)
    first = batches(loader, 2)  # the second batch comes from shard 1
    assert first[1][0][0][0].item() == 100_000 % 65536
    loader.rewind()
    assert torch.equal(batches(loader, 1)[0][0][0], first[0][0][0])


@pytest.mark.parametrize("pattern", ["", "folder"])
def test_empty_or_folder_pattern_names_the_setting_and_suggests_a_glob(tmp_path, monkeypatch, pattern):
    write_shard(tmp_path / "v_000.bin", np.arange(10))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        find_shards(str(tmp_path) if pattern else "", "VAL_FILES")
    assert "VAL_FILES" in str(e.value) and "*.bin" in str(e.value) and "no such shard" not in str(e.value)
    if pattern:
        assert f"{tmp_path}/*.bin" in str(e.value)


def test_shards_to_read_are_those_the_loader_reaches(tmp_path):
    # 2500 tokens fill two batches of 1024 (+1 target), 1100 one: 3 batches need shards 0 and 1, 4 wrap to shard 2
    files = counting_shards(tmp_path, [2500, 1100, 3000])
    assert train_gpt.shards_to_read(files, 1024, 2) == files[:1]
    assert train_gpt.shards_to_read(files, 1024, 3) == files[:2]
    assert train_gpt.shards_to_read(files, 1024, 4) == files
    assert train_gpt.shards_to_read(files, 1024, 100) == files
    assert train_gpt.shards_to_read(files, 1024, 1, file_idx=0, pos=1024) == files[:1]  # a resumed loader
    assert train_gpt.shards_to_read(files, 1024, 1, file_idx=0, pos=2048) == files[:2]
    loader = DataLoader(files, 1024, 256, 0, 1, CPU)
    for _ in range(4):
        loader.next_batch()
    assert loader.file_idx == 2


def test_token_id_outside_the_vocabulary_is_named_with_its_shard(tmp_path):
    tokens = np.arange(3000) % 50257
    tokens[1234] = 60000
    path = write_shard(tmp_path / "bad.bin", tokens)
    with pytest.raises(DataError) as e:
        train_gpt.check_vocab(path, 50257)
    assert str(path) in str(e.value) and "60000" in str(e.value) and "VOCAB_SIZE=50257" in str(e.value)
    assert "1234" in str(e.value)
    train_gpt.check_vocab(path, 60001)
