"""Packing and token-budget batching: packed rows reproduce the unpacked losses exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moepost.components.data.loading import IGNORE_INDEX, SFTExample
from moepost.components.data.packing import (
    PackedRow,
    collate_packed,
    collate_sft,
    pack_sft,
    packed_mask_for,
    without_trailing_padding_mask,
)
from moepost.micro_batches import batch_by_tokens, split_to_count

VOCAB = 97


def _example(length: int, prompt: int, seed: int) -> SFTExample:
    """Random ids; the first `prompt` tokens are context (label -100), the rest are targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
    return SFTExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


@pytest.fixture(scope="module")
def examples() -> list[SFTExample]:
    return [_example(5, 2, 1), _example(7, 3, 2), _example(4, 1, 3), _example(6, 2, 4)]


def _model(attn: str) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config._attn_implementation = attn
    return Qwen3MoeForCausalLM(config).float().eval()


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], labels [B, T] unshifted -> sum of token cross-entropies."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def test_pack_sft_first_fit_keeps_order_and_never_splits(examples: list[SFTExample]) -> None:
    # lengths 5, 7, 4, 6 into 12: row0 = 5 + 7 = 12 (full); 4 opens row1; 6 fits row1 (4 + 6 = 10).
    rows = pack_sft(examples, 12)
    assert [r.lengths for r in rows] == [[5, 7], [4, 6]]
    assert rows[0].input_ids == examples[0].input_ids + examples[1].input_ids
    # First fit reaches back: into 11, 5 opens row0 (6 free), 7 opens row1 (4 free), 4 goes to
    # row0, the first with room (2 free left), and 6 fits neither (2, 4 free) so opens row2.
    rows = pack_sft(examples, 11)
    assert [r.lengths for r in rows] == [[5, 4], [7], [6]]
    with pytest.raises(ValueError, match="longer than max_seq_length"):
        pack_sft(examples, 6)


def test_collate_packed_labels_positions_and_mask() -> None:
    row = PackedRow(input_ids=[11, 12, 13, 21, 22], labels=[-100, 12, 13, -100, 22], lengths=[3, 2])
    short = PackedRow(input_ids=[31, 32], labels=[31, 32], lengths=[2])
    batch = collate_packed([row, short], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 0, 0, 0]]
    # Each example's first token loses its label: 21 would be predicted from 13 across the seam.
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, 32, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["token_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    # The padding tail is its own causal block, so padded queries never see an empty row.
    assert mask[1, 0, 4].int().tolist() == [0, 0, 1, 1, 1]
    additive = collate_packed([row], 0, mask="float")["attention_mask"]
    lowest = torch.finfo(torch.float32).min
    # Query 3 (token 21, first of the second example) sees only itself.
    assert additive[0, 0, 3].tolist() == [lowest, lowest, lowest, 0.0, lowest]
    flat = collate_packed([row, short], 0, mask="flat")
    assert "attention_mask" not in flat
    assert flat["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def test_packed_mask_for_implementations() -> None:
    assert packed_mask_for("sdpa") == "bool" and packed_mask_for(None) == "bool"
    assert packed_mask_for("eager") == "float"
    assert packed_mask_for("flash_attention_2") == "flat"


@pytest.mark.parametrize(
    ("attn", "mask"), [("eager", "float"), ("sdpa", "bool"), ("sdpa", "flat"), ("eager", "flat")]
)
def test_packed_loss_equals_unpacked(examples: list[SFTExample], attn: str, mask: str) -> None:
    model = _model(attn)
    with torch.no_grad():
        unpacked_loss = torch.zeros(())
        unpacked_logits = []
        for ex in examples:
            out = model(input_ids=torch.tensor([ex.input_ids]))
            unpacked_logits.append(out.logits[0])
            unpacked_loss += _summed_loss(out.logits, torch.tensor([ex.labels]))
        # 5 + 7 + 4 = 16 fill row 0; 6 goes to row 1 with 10 padding tokens behind it.
        rows = pack_sft(examples, 16)
        assert [r.lengths for r in rows] == [[5, 7, 4], [6]]
        batch = collate_packed(rows, pad_token_id=0, mask=mask)  # type: ignore[arg-type]
        model_inputs = {k: v for k, v in batch.items() if k not in ("labels", "token_mask")}
        # use_cache=False matters for "flat": with a cache transformers skips packed detection.
        packed = model(**model_inputs, use_cache=False).logits
    packed_loss = _summed_loss(packed, batch["labels"])
    assert torch.allclose(packed_loss, unpacked_loss, rtol=0, atol=1e-5)
    # Token by token the logits match, not only the sum.
    packed_tokens = packed.reshape(-1, VOCAB)[batch["token_mask"].reshape(-1).bool()]
    assert torch.allclose(packed_tokens, torch.cat(unpacked_logits), atol=1e-5)


def test_collate_sft_right_pads(examples: list[SFTExample]) -> None:
    batch = collate_sft([examples[2], examples[0]], pad_token_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == examples[2].labels + [IGNORE_INDEX]
    assert batch["input_ids"][0, 4].item() == 0


def test_batch_by_tokens() -> None:
    # Budget 12: [3, 4, 2] pads to 3 * 4 = 12; adding 5 would need 4 * 5 = 20.
    # [5, 1] pads to 10; adding 6 would need 18; [6, 6] = 12; 13 is over budget alone.
    lengths = [3, 4, 2, 5, 1, 6, 6, 13, 1]
    assert batch_by_tokens(lengths, 12) == [[0, 1, 2], [3, 4], [5, 6], [7], [8]]
    # Two rows at most: [3, 4] -> 8, [2, 5] -> 10, [1, 6] -> 12, then [6] (6 + 13 -> 26), [13], [1].
    assert batch_by_tokens(lengths, 12, max_rows=2) == [[0, 1], [2, 3], [4, 5], [6], [7], [8]]
    assert batch_by_tokens([], 10) == []
    # Packed (one padding-free row): the lengths add up. 3+4+2 = 9 (adding 5: 14); 5+1+6 = 12.
    assert batch_by_tokens(lengths, 12, packed=True) == [[0, 1, 2], [3, 4, 5], [6], [7], [8]]
    with pytest.raises(ValueError, match="max_tokens"):
        batch_by_tokens([1], 0)


def test_split_to_count_halves_the_costliest_group() -> None:
    lengths = [10, 10, 10, 10, 3, 3, 2]
    # Costs: [0..3] 4 x 10 = 40, [4, 5] 6, [6] 2. The first split halves the 40 one.
    assert split_to_count([[0, 1, 2, 3], [4, 5], [6]], lengths, 4) == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6],
    ]
    # Next: [0, 1] and [2, 3] cost 20 each (first wins), then [2, 3], then [4, 5] (6).
    assert split_to_count([[0, 1, 2, 3], [4, 5], [6]], lengths, 7) == [[i] for i in range(7)]
    assert split_to_count([[0], [1]], lengths, 2) == [[0], [1]]
    # Padded, [5, 1, 1, 1] costs 4 x 5 = 20 > [6, 6] = 12; packed, 8 < 12.
    uneven = [5, 1, 1, 1, 6, 6]
    assert split_to_count([[0, 1, 2, 3], [4, 5]], uneven, 3) == [[0, 1], [2, 3], [4, 5]]
    assert split_to_count([[0, 1, 2, 3], [4, 5]], uneven, 3, packed=True) == [
        [0, 1, 2, 3],
        [4],
        [5],
    ]
    with pytest.raises(ValueError, match="cannot make 8 groups"):
        split_to_count([[0, 1, 2, 3], [4, 5], [6]], lengths, 8)
    with pytest.raises(ValueError, match="cannot make 1 groups"):
        split_to_count([[0], [1]], lengths, 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_trailing_padding_mask_dropped_without_changing_real_positions(
    examples: list[SFTExample], attn: str
) -> None:
    model = _model(attn).eval()
    batch = collate_sft(examples[:4], pad_token_id=0)  # right-padded rows of different lengths
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    fast = without_trailing_padding_mask(inputs)
    assert "attention_mask" not in fast
    assert torch.equal(fast["position_ids"][1], torch.arange(batch["input_ids"].shape[1]))
    real = batch["attention_mask"].bool()
    assert not bool(real.all())  # the batch has padding to drop
    with torch.no_grad():
        ref = model(**inputs, use_cache=False).logits
        out = model(**fast, use_cache=False).logits
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)


def test_left_padding_holes_and_packed_masks_are_kept() -> None:
    left = {
        "input_ids": torch.ones(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
    }
    hole = {
        "input_ids": torch.ones(1, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 0, 1, 0]]),
    }
    packed = {
        "input_ids": torch.ones(1, 4, dtype=torch.long),
        "attention_mask": torch.ones(1, 1, 4, 4, dtype=torch.bool),
    }
    for inputs in (left, hole, packed):
        assert without_trailing_padding_mask(inputs) is inputs
    full = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
    }
    assert set(without_trailing_padding_mask(full)) == {"input_ids", "position_ids"}
