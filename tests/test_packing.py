"""Packing conversations: whole, never split, and never attending to each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from penwright.batches import Packed, pack
from penwright.losses import IGNORE, keeps_packed_apart, lm_loss

VOCAB = 120


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def conversations(lengths, seed=0):
    """Token arrays with masks (the second half of each learned) and where each starts."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, VOCAB, n) for n in lengths]
    masks = [np.r_[np.zeros(n - n // 2, np.uint8), np.ones(n // 2, np.uint8)] for n in lengths]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.concatenate(ids).astype(np.uint16), np.concatenate(masks), starts


@pytest.mark.parametrize("make", [gpt2, llama])
@pytest.mark.parametrize("fused", [True, False])
def test_a_conversation_packed_with_others_has_its_loss_alone(make, fused):
    torch.manual_seed(0)
    model = make().eval()
    tokens, mask, starts = conversations([23, 9, 17, 30, 5, 12])
    packed = Packed(tokens, mask, starts, 64, 2, seed=0)
    assert packed.windows < 6, "several conversations share a block"
    x, y, positions = packed.rows(range(packed.windows))
    for c in range(6):
        block = next(b for b, members in enumerate(packed.packs) if c in members)
        at = sum(packed.lengths[m] for m in packed.packs[block][:packed.packs[block].index(c)])
        size = packed.lengths[c]
        # Only this conversation's targets, in its packed place ...
        y_one = torch.full_like(y[block:block + 1], IGNORE)
        y_one[0, at:at + size] = y[block, at:at + size]
        with torch.no_grad():
            together = lm_loss(model, x[block:block + 1], y_one, reduction="sum", fused=fused,
                               positions=positions[block:block + 1])
            # ... against the conversation on its own.
            ids = torch.from_numpy(tokens[starts[c]:starts[c + 1]].astype(np.int64))[None]
            target = ids[:, 1:].clone()
            target[torch.from_numpy(mask[starts[c] + 1:starts[c + 1]] == 0)[None]] = IGNORE
            alone = lm_loss(model, ids[:, :-1], target, reduction="sum", fused=fused)
        assert int((y_one != IGNORE).sum()) == int((target != IGNORE).sum()) > 0
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert keeps_packed_apart(model)


def test_without_restarting_positions_the_conversations_would_read_each_other():
    """The control for the test above: the same packed row with plain positions scores differently."""
    torch.manual_seed(0)
    model = gpt2().eval()
    tokens, mask, starts = conversations([20, 20])
    x, y, positions = Packed(tokens, mask, starts, 64, 1, seed=0).rows([0])
    with torch.no_grad():
        apart = lm_loss(model, x, y, reduction="sum", positions=positions)
        mixed = lm_loss(model, x, y, reduction="sum")
    assert (apart - mixed).abs() > 1e-3


class IgnoresPositions(torch.nn.Module):
    """A model whose forward drops position_ids: packing would leak on it."""

    def __init__(self):
        super().__init__()
        self.inner = gpt2()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


def test_a_model_that_ignores_restarting_positions_is_found_out():
    assert not keeps_packed_apart(IgnoresPositions())


def test_blocks_hold_whole_conversations_and_drop_or_cut_the_long_ones():
    lengths = [5, 40, 12, 70, 33, 8, 64, 3]
    tokens, mask, starts = conversations(lengths)
    dropped = Packed(tokens, mask, starts, 64, 1, seed=0)
    members = sorted(c for block in dropped.packs for c in block)
    assert members == [0, 1, 2, 4, 5, 6, 7] and dropped.too_long == 1  # the 70 is left out
    assert all(sum(lengths[c] for c in block) <= 64 for block in dropped.packs)
    x, y, positions = dropped.rows(range(dropped.windows))
    for block, row in zip(dropped.packs, range(dropped.windows)):
        at = 0
        for c in block:  # each conversation whole and in order, positions from 0
            whole = torch.from_numpy(tokens[starts[c]:starts[c + 1]].astype(np.int64))
            assert torch.equal(x[row, at:at + lengths[c]], whole)
            assert torch.equal(positions[row, at:at + lengths[c]], torch.arange(lengths[c]))
            assert y[row, at + lengths[c] - 1] == IGNORE  # a conversation's last token predicts nothing
            at += lengths[c]
        assert (y[row, at:] == IGNORE).all()  # padding
    cut = Packed(tokens, mask, starts, 64, 1, seed=0, truncate=True)
    assert sorted(c for block in cut.packs for c in block) == list(range(8)) and cut.lengths[3] == 64


def test_packed_batches_are_a_pure_function_of_seed_and_index_and_ranks_split_them():
    tokens, mask, starts = conversations(list(range(4, 40)) * 3)
    one = Packed(tokens, mask, starts, 64, 4, seed=3)
    halves = [Packed(tokens, mask, starts, 64, 2, seed=3, rank=r, world=2) for r in (0, 1)]
    for i in (0, 3, one.per_epoch + 1):
        x, y, positions = one.get(i)
        assert torch.equal(x, Packed(tokens, mask, starts, 64, 4, seed=3).get(i)[0])
        assert torch.equal(x, torch.cat([h.get(i)[0] for h in halves]))
        assert torch.equal(positions, torch.cat([h.get(i)[2] for h in halves]))
    assert not torch.equal(one.get(0)[0], one.get(one.per_epoch)[0]), "each epoch has its own order"


def test_best_fit_packs_tightly():
    lengths = np.array([60, 50, 40, 30, 20, 14, 10, 4, 4])
    blocks = pack(lengths, 64, np.arange(len(lengths)))
    assert sorted(map(sorted, blocks)) == sorted(map(sorted, [[0, 7], [1, 5], [2, 4, 8], [3, 6]]))
