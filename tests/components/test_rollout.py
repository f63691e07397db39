"""HFRolloutEngine on a tiny random Qwen3-MoE with a character-level tokenizer (no download)."""

from __future__ import annotations

import sys

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moepost.components.rollout.engine import (
    HFRolloutEngine,
    RolloutBatch,
    SamplingParams,
    build_engine,
    build_training_tensors,
    sample_tokens,
)
from moepost.errors import UserError

PAD, EOS = 0, 1
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,+-=#?"
PROMPTS_TEXT = ["abc", "hello world", "2+2="]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<eos>": EOS, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked next-token distributions: greedy has no near-ties
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    return Qwen3MoeForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def prompts(tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    return [tokenizer(t).input_ids for t in PROMPTS_TEXT]


def engine(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, **kw: object
) -> HFRolloutEngine:
    kw = {"eos_token_ids": [EOS], "pad_token_id": PAD, **kw}
    return HFRolloutEngine(model, tokenizer, **kw)  # type: ignore[arg-type]


def greedy(n: int, max_new: int = 8, **kw: object) -> SamplingParams:
    return SamplingParams(num_samples_per_prompt=n, max_new_tokens=max_new, greedy=True, **kw)  # type: ignore[arg-type]


def forward_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, temperature: float
) -> torch.Tensor:
    """Training-side log-probs [N, T] of the completions from one full forward pass."""
    t = build_training_tensors(batch.prompt_ids, batch.completion_ids, PAD)
    n_pos = t["num_completion_positions"]
    with torch.no_grad():
        out = model(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            position_ids=t["position_ids"],
            logits_to_keep=n_pos + 1,
        )
    logits = out.logits[:, :-1].float() / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, t["completion_ids"][..., None]).squeeze(-1)
    return lp * t["completion_mask"]


def test_shared_prefix_equals_prefilling_every_copy(model, tokenizer, prompts):
    params = greedy(3)
    shared = engine(model, tokenizer).generate(prompts, params)
    copies = engine(model, tokenizer, share_prefix=False).generate(prompts, params)
    assert shared.completion_ids == copies.completion_ids
    torch.testing.assert_close(shared.logprobs, copies.logprobs, atol=1e-5, rtol=0)
    # Prompt-major rows: the 3 greedy samples of a prompt are identical copies.
    assert shared.prompt_ids[3:6] == [prompts[1]] * 3
    assert shared.completion_ids[3] == shared.completion_ids[4] == shared.completion_ids[5]
    assert shared.num_prompt_tokens == 3 + 11 + 4  # "abc", "hello world", "2+2="


def test_left_padded_batch_equals_each_prompt_alone(model, tokenizer, prompts):
    eng = engine(model, tokenizer)
    batch = eng.generate(prompts, greedy(1))
    for i, prompt in enumerate(prompts):
        alone = eng.generate([prompt], greedy(1))
        assert batch.completion_ids[i] == alone.completion_ids[0]
        torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        greedy(2, max_new=10),
        SamplingParams(3, 10, temperature=0.7, top_k=10, top_p=0.9, seed=3),
    ],
    ids=["greedy", "sampled_t0.7_topk_topp"],
)
def test_logprobs_match_training_forward(model, tokenizer, prompts, params):
    # Making row 0's 4th token an EOS ends rows at different lengths, so right padding of
    # completions is exercised; micro_batch_size 4 with G <= 3 runs one prompt per chunk.
    free = engine(model, tokenizer).generate(prompts, params)
    eos_ids = [EOS, free.completion_ids[0][3]]
    eng = engine(model, tokenizer, eos_token_ids=eos_ids, micro_batch_size=4)
    batch = eng.generate(prompts, params)
    lengths = [len(c) for c in batch.completion_ids]
    assert len(set(lengths)) > 1
    assert batch.logprobs.shape == (len(prompts) * params.num_samples_per_prompt, max(lengths))
    expected = forward_logprobs(model, batch, params.logprob_temperature)
    torch.testing.assert_close(batch.logprobs, expected, atol=1e-4, rtol=0)
    assert batch.num_completion_tokens == sum(lengths)


def first_hit(ids: list[int], tokenizer, stop: str) -> int | None:
    """Index of the token that completes the first occurrence of `stop`, if any."""
    for j in range(len(ids)):
        if stop in tokenizer.decode(ids[: j + 1], skip_special_tokens=True):
            return j
    return None


def test_stop_string_cuts_text_and_ids(model, tokenizer, prompts):
    eng = engine(model, tokenizer)
    free = eng.generate(prompts, greedy(1))
    stop = free.completion_texts[0][2:4]
    cut = eng.generate(prompts, greedy(1, stop=[stop]))
    assert cut.finish_reason[0] == "stop"
    for i, ids in enumerate(free.completion_ids):
        j = first_hit(ids, tokenizer, stop)
        if j is None:
            assert cut.completion_ids[i] == ids and cut.finish_reason[i] == free.finish_reason[i]
            continue
        # Ids run through the token completing the stop string; the text stops before it.
        assert cut.completion_ids[i] == ids[: j + 1]
        text = free.completion_texts[i]
        assert cut.completion_texts[i] == text[: text.find(stop)]
        assert cut.finish_reason[i] == "stop" and not cut.truncated[i]


def test_eos_stops_rows_and_loop_ends_when_all_finished(model, tokenizer, prompts):
    free = engine(model, tokenizer).generate(prompts, greedy(1))
    assert free.finish_reason == ["length"] * 3 and all(free.truncated)
    eos_ids = sorted({ids[1] for ids in free.completion_ids})
    calls: list[tuple[int, str]] = []
    eng = engine(
        model, tokenizer, eos_token_ids=eos_ids, step_callback=lambda s, p: calls.append((s, p))
    )
    batch = eng.generate(prompts, greedy(1))
    ends = [min(k for k, t in enumerate(ids) if t in eos_ids) for ids in free.completion_ids]
    assert max(ends) <= 1 < 8 - 1
    for i, ids in enumerate(free.completion_ids):
        assert batch.completion_ids[i] == ids[: ends[i] + 1]  # the EOS token is kept
        assert batch.finish_reason[i] == "eos" and not batch.truncated[i]
    # One prefill, then one decode forward per token after the first, stopping at the last EOS.
    assert calls == [(0, "prefill")] + [(s, "decode") for s in range(1, max(ends) + 1)]


def test_seed_reproducible(model, tokenizer, prompts):
    eng = engine(model, tokenizer)
    a = eng.generate(prompts, SamplingParams(4, 8, seed=1))
    b = eng.generate(prompts, SamplingParams(4, 8, seed=1))
    c = eng.generate(prompts, SamplingParams(4, 8, seed=2))
    assert a.completion_ids == b.completion_ids
    assert torch.equal(a.logprobs, b.logprobs)
    assert a.completion_ids != c.completion_ids


def test_top_k_one_equals_greedy(model, tokenizer, prompts):
    eng = engine(model, tokenizer)
    g = eng.generate(prompts, greedy(2))
    k1 = eng.generate(prompts, SamplingParams(2, 8, top_k=1, seed=0))
    assert g.completion_ids == k1.completion_ids
    torch.testing.assert_close(g.logprobs, k1.logprobs, atol=0, rtol=0)


def test_top_p_samples_nucleus_but_reports_unfiltered_logprobs():
    # probs [0.5, 0.3, 0.2], top_p 0.7: mass before token 1 is 0.5 < 0.7 (kept), before token 2
    # is 0.8 >= 0.7 (dropped). The reported log-prob is log p of the full distribution.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    tokens, lp = sample_tokens(logits, SamplingParams(1, 1, top_p=0.7), gen)
    assert set(tokens.tolist()) == {0, 1}
    expected = torch.log(torch.tensor([0.5, 0.3]))[tokens]
    torch.testing.assert_close(lp, expected)


def test_generation_restores_train_mode(model, tokenizer, prompts):
    model.train()
    try:
        engine(model, tokenizer).generate(prompts[:1], greedy(1, max_new=2))
        assert model.training
    finally:
        model.eval()


def test_build_training_tensors_layout():
    # P = 2 (longest prompt), T = 3 (longest completion); row = [pad | prompt | completion | pad].
    t = build_training_tensors([[5, 6], [7]], [[8], [9, 10, 11]], pad_token_id=0)
    assert t["input_ids"].tolist() == [[5, 6, 8, 0, 0], [0, 7, 9, 10, 11]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]]
    assert t["completion_ids"].tolist() == [[8, 0, 0], [9, 10, 11]]
    assert t["completion_mask"].tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert (t["num_completion_positions"], t["prompt_length"]) == (3, 2)


def test_bad_inputs_raise_user_error(model, tokenizer, monkeypatch):
    with pytest.raises(UserError, match="generation.top_p"):
        SamplingParams(1, 4, top_p=0.0)
    with pytest.raises(UserError, match="generation.backend"):
        build_engine("sglang", model, tokenizer)
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'moepost\[vllm\]'"):
        build_engine("vllm", model, tokenizer)


def test_reserved_cache_layer_matches_concatenation() -> None:
    from transformers.cache_utils import DynamicLayer

    from moepost.components.rollout.kv_cache import ReservedLayer

    torch.manual_seed(0)
    plain, reserved = DynamicLayer(), ReservedLayer(reserve=2)
    chunks = [torch.randn(2, 3, n, 4) for n in (5, 1, 1, 1, 1)]  # a prefill, then 4 decode steps
    for i, chunk in enumerate(chunks):
        if i == 1:  # a group of 2 samples per prompt, as the engine does after prefill
            plain.batch_repeat_interleave(2)
            reserved.batch_repeat_interleave(2)
        k_plain, v_plain = plain.update(
            chunk.repeat(2 if i else 1, 1, 1, 1), -chunk.repeat(2 if i else 1, 1, 1, 1)
        )
        k_res, v_res = reserved.update(
            chunk.repeat(2 if i else 1, 1, 1, 1), -chunk.repeat(2 if i else 1, 1, 1, 1)
        )
        assert torch.equal(k_plain, k_res) and torch.equal(v_plain, v_res)
        assert reserved.get_seq_length() == plain.get_seq_length()
    # 5 + 1 positions buffered after the repeat, +2 reserve: the 3rd decode step re-buffers once
    assert reserved._key_buf is not None and reserved._key_buf.shape[-2] == 9 + 2


def test_reserved_cache_generation_is_bit_identical(model, tokenizer, prompts, monkeypatch):
    from transformers import DynamicCache

    import moepost.components.rollout.engine as rollout

    params = SamplingParams(num_samples_per_prompt=4, max_new_tokens=12, temperature=1.0, seed=3)
    fast = engine(model, tokenizer).generate(prompts, params)
    monkeypatch.setattr(
        rollout, "reserved_cache", lambda config, reserve: DynamicCache(config=config)
    )
    plain = engine(model, tokenizer).generate(prompts, params)
    assert fast.completion_ids == plain.completion_ids
    assert torch.equal(fast.logprobs, plain.logprobs)


@pytest.mark.parametrize("chunk_rows", [0, 8])
def test_finished_rows_leave_the_decode_batch(model, tokenizer, prompts, chunk_rows):
    """compact_finished drops finished rows from the decode batch (and their KV cache rows):
    same tokens, finish reasons and log-probs as keeping every row, the same routes for every
    token it fed, and forwards that really ran on fewer rows (in one chunk of 12 rows, or in
    chunks of 8 and 4)."""
    from moepost.components.moe.router_setup import router_setup
    from moepost.components.rollout.batch_routes import capture_generation, generation_routes
    from moepost.config.schema import MoEConfig

    eos_ids = list(range(2, 14))  # frequent enough that rows end at different steps
    params = SamplingParams(num_samples_per_prompt=4, max_new_tokens=16, temperature=1.0, seed=5)
    runs = {}
    for compact in (True, False):
        sizes: list[int] = []
        eng = engine(
            model,
            tokenizer,
            eos_token_ids=eos_ids,
            compact_finished=compact,
            micro_batch_size=chunk_rows,
        )
        eng.step_callback = lambda s, p, e=eng, out=sizes: out.append(
            len(e.batch_rows) if e.batch_rows is not None else -1
        )
        router = router_setup(model, MoEConfig(routing_replay="r3"))
        with capture_generation(router, eng) as holder:
            batch = eng.generate(prompts, params)
        routes = generation_routes(router, holder, prompts, batch, micro_batch_size=chunk_rows)
        runs[compact] = (batch, routes, sizes)
    (fast, fast_routes, sizes), (full, full_routes, _) = runs[True], runs[False]
    lengths = [len(c) for c in full.completion_ids]
    assert len(set(lengths)) > 2, lengths  # rows did finish at different steps
    assert any(0 < size < 12 for size in sizes), sizes  # some forwards ran on fewer rows
    assert fast.completion_ids == full.completion_ids
    assert fast.finish_reason == full.finish_reason
    torch.testing.assert_close(fast.logprobs, full.logprobs, atol=1e-5, rtol=0)
    for row, (a, b) in enumerate(zip(fast_routes, full_routes, strict=True)):
        fed = a[0, :, 0] >= 0
        assert torch.equal(a[:, fed], b[:, fed]), row
        # Only a row's last token may go unrouted: it left the batch before being fed.
        assert bool(fed[:-1].all()), row


class OtherRankRunsLonger:
    """A stand-in for the other ranks of lock-step generation: they have `chunks` chunks and
    decode until step `steps` of every chunk (the engine's step callback tells the step)."""

    def __init__(self, chunks: int, steps: int) -> None:
        self.chunks, self.steps, self.step = chunks, steps, 0
        self.any_calls = 0

    def at(self, step: int, phase: str) -> None:
        self.step = step

    def any_true(self, flag: bool) -> bool:
        self.any_calls += 1
        return flag or self.step < self.steps

    def max_int(self, value: int) -> int:
        return max(value, self.chunks)


@pytest.mark.parametrize("compact", [True, False])
def test_lockstep_keeps_stepping_and_changes_nothing(model, tokenizer, prompts, compact):
    """With `lockstep`, a rank whose rows are done keeps decoding (on one finished row) while
    another rank runs, and runs the other rank's extra chunks on a dummy prompt; its tokens,
    log-probs, finish reasons and captured routes equal the free-running loop's exactly, and
    those extra forwards are tagged idle."""
    from moepost.components.moe.router_setup import router_setup
    from moepost.components.rollout.batch_routes import capture_generation, generation_routes
    from moepost.config.schema import MoEConfig

    eos_ids = list(range(2, 40))  # rows end early and at different steps
    params = SamplingParams(num_samples_per_prompt=4, max_new_tokens=16, temperature=1.0, seed=5)
    runs = {}
    for name in ("free", "lockstep"):
        other = OtherRankRunsLonger(chunks=3, steps=12) if name == "lockstep" else None
        eng = engine(
            model,
            tokenizer,
            eos_token_ids=eos_ids,
            compact_finished=compact,
            micro_batch_size=8,  # 2 prompts a chunk: 2 chunks here, 3 on the other rank
            lockstep=other,
        )
        calls: list[tuple[int, str, int]] = []

        def callback(s: int, p: str, e=eng, o=other, out=calls) -> None:
            out.append((s, p, len(e.batch_rows) if e.batch_rows is not None else -1))
            if o is not None:
                o.at(s, p)

        eng.step_callback = callback
        router = router_setup(model, MoEConfig(routing_replay="r3"))
        with capture_generation(router, eng) as holder:
            batch = eng.generate(prompts, params)
        routes = generation_routes(router, holder, prompts, batch, micro_batch_size=8)
        runs[name] = (batch, routes, calls, other)
    (free, free_routes, free_calls, _), (lock, lock_routes, lock_calls, other) = (
        runs["free"],
        runs["lockstep"],
    )
    assert max(len(c) for c in free.completion_ids) < 12  # the other rank runs longer
    assert lock.completion_ids == free.completion_ids
    assert lock.finish_reason == free.finish_reason
    assert torch.equal(lock.logprobs, free.logprobs)
    for a, b in zip(lock_routes, free_routes, strict=True):
        assert torch.equal(a, b)
    # Every chunk (3: the other rank's count) runs forwards 0..12, then stops with it.
    assert [s for s, _, _ in lock_calls] == list(range(13)) * 3
    assert [p for _, p, _ in lock_calls[26:]] == ["idle"] * 13  # the dummy third chunk
    assert other is not None and other.any_calls == 3 * 13
    real = [(s, p) for s, p, _ in lock_calls if p != "idle"]
    assert real == [(s, p) for s, p, _ in free_calls]  # the same real forwards as free-running
    if compact:  # an all-done rank steps on a single row
        assert all(n == 1 for _, p, n in lock_calls[1:26] if p == "idle")
