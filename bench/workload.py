"""What every benchmark runs on: the cached bench model and deterministic GSM8K-style data.

Built once into `bench/.cache/` (`MOEPOST_BENCH_CACHE` moves it) and reused by every run, so
both frameworks read the very same checkpoint and rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import CACHE


@dataclass(frozen=True)
class ModelSpec:
    """A random-weight Qwen3-MoE built by `moepost.tools.tiny_model.build_tiny_model`."""

    hidden_size: int = 256
    num_layers: int = 6
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate_size: int = 128  # 6 x 32 x 3 x 256 x 128 = 18.9 M expert parameters
    num_heads: int = 4
    num_kv_heads: int = 2
    dtype: str = "float32"
    seed: int = 0

    @property
    def key(self) -> str:
        s = self
        return (
            f"qwen3moe_h{s.hidden_size}_l{s.num_layers}_e{s.num_experts}_k{s.top_k}"
            f"_m{s.moe_intermediate_size}_a{s.num_heads}x{s.num_kv_heads}_{s.dtype}_s{s.seed}"
        )


def bench_model(spec: ModelSpec = ModelSpec(), cache: Path = CACHE) -> Path:
    """The checkpoint for `spec`, built on first use and reused afterwards."""
    import transformers

    out = cache / "models" / f"{spec.key}_tf{transformers.__version__}"
    done = out / "BENCH_OK"
    if done.is_file():
        return out
    _build(spec, out)
    done.write_text(json.dumps(asdict(spec)))
    return out


def _build(spec: ModelSpec, out: Path, **extra: Any) -> None:
    """`build_tiny_model` of `spec` into `out`; `extra` adds keywords (e.g. `vocab=`)."""
    from moepost.tools.tiny_model import build_tiny_model

    build_tiny_model(
        out,
        "qwen3_moe",
        seed=spec.seed,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        moe_intermediate_size=spec.moe_intermediate_size,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        dtype=spec.dtype,
        **extra,
    )


def parameter_counts(model_dir: Path) -> dict[str, int]:
    """Total and per-token active parameter counts, read from the checkpoint's tensors.

    Active = total - routed-expert parameters x (1 - top_k / num_experts). Embedding and LM head
    are included in both (the LM head runs on every token; the embedding lookup costs no FLOPs
    but is part of the model's size).
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    total = experts = embed = 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
                if ".experts." in name:
                    experts += n
                if "embed_tokens" in name:
                    embed += n
    frac = cfg.num_experts_per_tok / cfg.num_experts
    active = total - round(experts * (1.0 - frac))
    return {"total": total, "experts": experts, "active": active, "embedding": embed}


# ---------------------------------------------------------------- data

_NAMES = ("Ann", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana")
_ITEMS = ("apples", "pens", "coins", "books", "shells", "cards")


def arithmetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` GSM8K-style rows {question, answer="<working>\\n#### N"}, identical for a given seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if rng.random() < 0.5:
            q = f"{name} has {a} {item} and gets {b} more. How many {item} now?"
            work, result = f"{a} + {b} = {a + b}", a + b
        else:
            a = max(a, b + 1)
            q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
            work, result = f"{a} - {b} = {a - b}", a - b
        rows.append({"question": q, "answer": f"{work}\n#### {result}"})
    return rows


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def gsm8k_file(n: int = 256, seed: int = 0, cache: Path = CACHE) -> Path:
    """RL prompts in GSM8K form (question / answer)."""
    return write_jsonl(arithmetic_rows(n, seed), cache / "data" / f"arith_gsm8k_{n}_{seed}.jsonl")


def longest_prompt_tokens(model_dir: Path, data_file: Path) -> int:
    """Tokens of the longest RL prompt in `data_file` (its question as one user turn, with the
    generation prompt), as both frameworks build it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    return max(
        len(
            tok.apply_chat_template(
                [{"role": "user", "content": r["question"]}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for r in rows
    )


def chat_file(n: int = 256, seed: int = 0, turns: int = 1, cache: Path = CACHE) -> Path:
    """The same rows as chat messages for SFT: `turns` user/assistant pairs per conversation
    (more turns make longer sequences, for the GPU scale)."""
    qa = arithmetic_rows(n * turns, seed)
    rows = []
    for i in range(n):
        messages = []
        for r in qa[i * turns : (i + 1) * turns]:
            messages.append({"role": "user", "content": r["question"]})
            messages.append({"role": "assistant", "content": r["answer"]})
        rows.append({"messages": messages})
    return write_jsonl(rows, cache / "data" / f"arith_chat_{n}_{seed}_t{turns}.jsonl")


def mixed_chat_file(n: int = 256, seed: int = 0, max_turns: int = 5, cache: Path = CACHE) -> Path:
    """Conversations of 1..max_turns arithmetic turns (drawn per row): sequences of uneven
    length, where padding and micro-batch grouping matter."""
    rng = random.Random(seed + 1)
    turns = [rng.randint(1, max_turns) for _ in range(n)]
    qa = arithmetic_rows(sum(turns), seed)
    rows, at = [], 0
    for t in turns:
        messages = []
        for r in qa[at : at + t]:
            messages.append({"role": "user", "content": r["question"]})
            messages.append({"role": "assistant", "content": r["answer"]})
        rows.append({"messages": messages})
        at += t
    name = f"arith_chat_mixed_{n}_{seed}_t{max_turns}.jsonl"
    return write_jsonl(rows, cache / "data" / name)


# ---------------------------------------------------------------- a Qwen-sized vocabulary

BIG_VOCAB = 151_936  # Qwen2/Qwen3's vocabulary size


def big_vocab_model(spec: ModelSpec | None = None, cache: Path = CACHE) -> Path:
    """The bench model's body with a 151,936-entry vocabulary and a BPE tokenizer to match.

    The tokenizer keeps the char-level one's ids for the specials and characters (so the
    config's pad / eos ids hold), adds the merges a BPE trainer learns on the bench data (words
    with their leading space, digits one by one, so text takes fewer tokens than characters),
    and fills the rest of the vocabulary with entries no merge produces. Loading, embedding and
    LM head then cost what a Qwen-sized vocabulary costs; tokenisation is real BPE.
    """
    import transformers

    spec = spec or ModelSpec()
    out = cache / "models" / f"{spec.key}_v{BIG_VOCAB}_bpe_tf{transformers.__version__}"
    if (out / "BENCH_OK").is_file():
        return out
    _build(spec, out, vocab=BIG_VOCAB)
    _bpe_tokenizer().save_pretrained(out)  # replaces the char-level tokenizer files
    (out / "BENCH_OK").write_text(json.dumps({**asdict(spec), "vocab": BIG_VOCAB}))
    return out


def _bpe_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moepost.tools import tiny_model as tm

    base = tm.build_tokenizer()
    vocab = dict(base.get_vocab())
    # Merges learnt on the text both frameworks will see: questions, worked answers, roles.
    corpus = [f"{r['question']}\n{r['answer']}" for r in _corpus_rows()] + ["user\n", "assistant\n"]
    # GPT-style pieces: single digits (as Qwen splits numbers), words with their leading space,
    # punctuation runs, whitespace runs; "isolated" keeps every character, so decoding is a join.
    split = pre_tokenizers.Split(Regex(r"\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+"), behavior="isolated")
    learner = Tokenizer(models.BPE(unk_token=tm.UNK_TOKEN))
    learner.pre_tokenizer = split
    trainer = trainers.BpeTrainer(
        vocab_size=4096, initial_alphabet=sorted(set("".join(corpus))), show_progress=False
    )
    learner.train_from_iterator(corpus, trainer)
    merges = json.loads(learner.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    for a, b in pairs:
        vocab.setdefault(a + b, len(vocab))
    filler = 0
    while len(vocab) < BIG_VOCAB:
        vocab.setdefault(f"<|unused_{filler}|>", len(vocab))
        filler += 1
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=tm.UNK_TOKEN))
    backend.pre_tokenizer = split
    backend.decoder = decoders.Fuse()  # tokens are literal text pieces: concatenate them
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=tm.PAD_TOKEN,
        eos_token=tm.IM_END,
        unk_token=tm.UNK_TOKEN,
        additional_special_tokens=[tm.IM_START],
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(list(tm.THINK_TOKENS))  # already in the vocabulary: same ids
    tokenizer.chat_template = tm.CHAT_TEMPLATE
    return tokenizer


def _corpus_rows() -> list[dict[str, str]]:
    return arithmetic_rows(2048, seed=123)


# ---------------------------------------------------------------- the TRL side of GSM8K


def trl_gsm8k_dataset(data_file: Path) -> Any:
    """The GSM8K JSONL as the chat-format `Dataset` TRL's GRPOTrainer reads (prompt, answer)."""
    from datasets import Dataset

    rows = [json.loads(x) for x in Path(data_file).read_text().splitlines() if x.strip()]
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
            for r in rows
        ]
    )


def trl_gsm8k_reward(method: str) -> Any:
    """moepost's `gsm8k` reward (`method` strict or flexible) for TRL's chat-format completions.

    TRL hands each completion as [{"role": "assistant", "content": ...}]; the function's
    `__name__` is what TRL logs the reward under.
    """
    from moepost.rewards import gsm8k

    def reward(prompts: list[Any], completions: list[Any], answer: list[str], **_: Any) -> Any:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return gsm8k(prompts, texts, answer=answer, method=method)

    reward.__name__ = f"gsm8k_{method}"
    return reward
