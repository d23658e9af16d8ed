import warnings

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from train_gpt import BLOCK, EOT, Hyperparameters, attend, block_masks, dense_masks, window_blocks_at

T = 1024  # 8 blocks
WINDOWS = [0, 1, 2, 3, 5, 8, 20]  # in blocks; 0 means 1, 20 is longer than the sequence


def token_docs(layout: str) -> torch.Tensor:
    rng = np.random.default_rng(0)
    seq = rng.integers(0, EOT, size=T)
    if layout == "random":  # documents of 1 to 400 tokens
        ends = np.cumsum(rng.integers(1, 400, size=T))
        seq[ends[ends < T]] = EOT
    elif layout == "block_aligned":  # every document starts on a block boundary
        seq[[0, 128, 384, 896]] = EOT
    elif layout == "tiny":  # documents shorter than a block
        seq[rng.random(T) < 0.1] = EOT
    # "one": a single document without any EOT spans the whole sequence
    return (torch.from_numpy(seq) == EOT).cumsum(0)


def blocks_to_tokens(mask: BlockMask) -> torch.Tensor:
    # what the block-sparse kernel attends to: full blocks whole, partial blocks through the mask_mod
    n = T // BLOCK

    def table(num, idx):
        m = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            m[i, idx[0, 0, i, :num[0, 0, i]].long()] = True
        return m.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)

    pos = torch.arange(T)
    mod = mask.mask_mod(0, 0, pos[:, None], pos[None, :])
    return table(mask.full_kv_num_blocks, mask.full_kv_indices) | (table(mask.kv_num_blocks, mask.kv_indices) & mod)


def expected_mask(docs: torch.Tensor, w: int) -> torch.Tensor:
    pos = torch.arange(T)
    q, kv = pos[:, None], pos[None, :]
    return (kv <= q) & (docs[q] == docs[kv]) & (kv // BLOCK > q // BLOCK - max(w, 1))


@pytest.mark.parametrize("layout", ["random", "block_aligned", "tiny", "one"])
def test_dense_mask_is_document_causal_sliding_window(layout):
    docs = token_docs(layout)
    pos = torch.arange(T)
    q_block, kv_block = pos[:, None] // BLOCK, pos[None, :] // BLOCK
    for w in WINDOWS:
        long, short = dense_masks(docs, torch.tensor(w, dtype=torch.int32))
        for mask, blocks in ((long, w), (short, w // 2)):
            assert not (mask & (pos[None, :] > pos[:, None])).any(), "sees the future"
            assert not (mask & (docs[:, None] != docs[None, :])).any(), "crosses a document boundary"
            assert not (mask & (kv_block <= q_block - max(blocks, 1))).any(), "outside the window"
            assert mask.diagonal().all(), "a token must see itself"
            assert torch.equal(mask, expected_mask(docs, blocks)), "misses a visible token"


@pytest.mark.parametrize("layout", ["random", "block_aligned", "tiny", "one"])
def test_block_masks_match_dense_masks(layout):
    docs = token_docs(layout)
    for w in WINDOWS:
        window = torch.tensor(w, dtype=torch.int32)
        for block, dense in zip(block_masks(docs, window), dense_masks(docs, window)):
            assert torch.equal(blocks_to_tokens(block), dense), f"window {w}"


def test_flex_attention_with_block_mask_matches_dense_attention():
    # Eager flex_attention (CPU) applies only the mask_mod and ignores the block tables, which is where the
    # window lives; so the BlockMask gets a mask_mod that spells out what its tables select, as the GPU kernel does.
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, T, 64).unbind(0)
    docs = token_docs("random")
    for w in (0, 1, 3, 20):
        window = torch.tensor(w, dtype=torch.int32)
        for block, dense in zip(block_masks(docs, window), dense_masks(docs, window)):
            visible = blocks_to_tokens(block)
            kernel_view = BlockMask.from_kv_blocks(block.kv_num_blocks, block.kv_indices, block.full_kv_num_blocks,
                                                   block.full_kv_indices, BLOCK_SIZE=BLOCK,
                                                   mask_mod=lambda b, h, qi, ki: visible[qi, ki])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out_flex = attend(q, k, v, kernel_view, scale=0.12)
            out_dense = attend(q, k, v, dense, scale=0.12)
            torch.testing.assert_close(out_flex, out_dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window_max,num_iterations", [(1792, 1770), (256, 20), (128, 7)])
def test_window_grows_from_one_block_to_window_max(window_max, num_iterations):
    args = Hyperparameters(window_max=window_max, num_iterations=num_iterations)
    blocks = [window_blocks_at(s, args) for s in range(num_iterations + 1)]
    assert blocks[0] == 1
    assert blocks[-1] == window_max // BLOCK
    assert all(a <= b for a, b in zip(blocks, blocks[1:]))
    assert max(blocks) == window_max // BLOCK
    if window_max // BLOCK > 2:  # it grows along the way, not in one jump at the end
        assert 1 < blocks[num_iterations // 2] < window_max // BLOCK
