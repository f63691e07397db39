"""Data loading: sources, formats, assistant-only label masks, splits, RL prompts, conversion.

A char-level tokenizer (one token per character, ChatML template) makes label masks readable:
the labelled spans decode to exactly the characters that carry loss.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from moepost.components.data.files import FORMAT_CONVERTERS, convert_gsm8k_to_chat, read_rows
from moepost.components.data.formats import FORMAT_SHAPES, detect_format
from moepost.components.data.loading import (
    IGNORE_INDEX,
    SFTExample,
    load_rl_data,
    load_rows,
    load_sft_data,
    tokenize_conversation,
)
from moepost.config.schema import DataConfig, MiscConfig
from moepost.errors import UserError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
END = "<|im_end|>\n"
EOT = "<|im_end|>"
GEN = "<|im_start|>assistant\n"


def char_tokenizer(template: str = CHATML, bos: bool = False) -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars + ["<unk>"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()  # one char per token: join without spaces
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        bos_token="<s>" if bos else None,
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return char_tokenizer()


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def spans(tok: PreTrainedTokenizerFast, ex: SFTExample) -> list[str]:
    """Decoded runs of consecutive labelled tokens; also checks labels equal the input ids."""
    out: list[str] = []
    previous = False
    for i, (token, label) in enumerate(zip(ex.input_ids, ex.labels)):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token, f"label at {i} is not the input token"
            piece = tok.decode([token])
            out[-1:] = [out[-1] + piece] if previous else [*out, piece]
        previous = trained
    return out


def sft(tmp_path: Path, tok: Any, rows: list[Any], **data: Any) -> tuple[list[SFTExample], dict]:
    cfg = DataConfig(train_file=write_jsonl(tmp_path / "train.jsonl", rows), **data)
    train, _, stats = load_sft_data(cfg, MiscConfig(), tok)
    return train, stats


# ---------------------------------------------------------------- formats and label masks


def test_messages_multi_turn_masks_only_assistant_turns(tmp_path: Path, tok: Any) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    (ex,), stats = sft(tmp_path, tok, [row])
    text = tok.decode(ex.input_ids)
    assert text == (
        f"<|im_start|>system\nS{END}<|im_start|>user\nu1{END}{GEN}a1{END}"
        f"<|im_start|>user\nu2{END}{GEN}a2{END}"
    )
    # Each assistant turn trains on its content and the end-of-turn token, not the newline after.
    assert spans(tok, ex) == [f"a1{EOT}", f"a2{EOT}"]
    assert sum(label != IGNORE_INDEX for label in ex.labels) == 2 * (2 + 1)
    assert stats["num_train"] == 1 and stats["num_truncated"] == 0


def test_conversations_key_with_role_content(tmp_path: Path, tok: Any) -> None:
    row = {
        "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    }
    (ex,), _ = sft(tmp_path, tok, [row])
    assert spans(tok, ex) == [f"r{EOT}"]


def test_alpaca_with_input_and_system(tmp_path: Path, tok: Any) -> None:
    row = {"instruction": "do", "input": "this", "output": "done", "system": "be brief"}
    (ex,), _ = sft(tmp_path, tok, [row])
    assert tok.decode(ex.input_ids) == (
        f"<|im_start|>system\nbe brief{END}<|im_start|>user\ndo\n\nthis{END}{GEN}done{END}"
    )
    assert spans(tok, ex) == [f"done{EOT}"]


def test_sharegpt_roles(tmp_path: Path, tok: Any) -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"},
        ]
    }
    (ex,), _ = sft(tmp_path, tok, [row])
    assert (
        tok.decode(ex.input_ids)
        == f"<|im_start|>system\nS{END}<|im_start|>user\nhi{END}{GEN}yo{END}"
    )
    assert spans(tok, ex) == [f"yo{EOT}"]


def test_prompt_completion_string_and_messages_prompt(tmp_path: Path, tok: Any) -> None:
    rows = [
        {"prompt": "2+2?", "completion": "4"},
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}],
            "completion": "y",
        },
    ]
    (first, second), _ = sft(tmp_path, tok, rows)
    assert tok.decode(first.input_ids) == f"<|im_start|>user\n2+2?{END}{GEN}4{END}"
    assert spans(tok, first) == [f"4{EOT}"]
    assert spans(tok, second) == [f"y{EOT}"]


def test_text_trains_on_every_token_and_ends_with_eos(tmp_path: Path, tok: Any) -> None:
    (ex,), _ = sft(tmp_path, tok, [{"text": "abc"}])
    # 'a', 'b', 'c' + EOS; no chat template, the tiny tokenizer has no BOS.
    assert ex.input_ids == tok.convert_tokens_to_ids(["a", "b", "c", "<|im_end|>"])
    assert ex.labels == ex.input_ids


def test_gsm8k_sft_target_is_the_answer_text(tmp_path: Path, tok: Any) -> None:
    (ex,), _ = sft(tmp_path, tok, [{"question": "1+2?", "answer": "1+2=3\n#### 3"}])
    assert spans(tok, ex) == [f"1+2=3\n#### 3{EOT}"]


def test_key_overrides(tmp_path: Path, tok: Any) -> None:
    rows = [{"problem": "p", "solution": "s"}]
    (ex,), _ = sft(tmp_path, tok, rows, format="gsm8k", prompt_key="problem", answer_key="solution")
    assert tok.decode(ex.input_ids) == f"<|im_start|>user\np{END}{GEN}s{END}"
    assert spans(tok, ex) == [f"s{EOT}"]


def test_template_adding_bos_is_not_doubled(tmp_path: Path) -> None:
    tok = char_tokenizer(template="{{ bos_token }}" + CHATML, bos=True)
    bos = tok.convert_tokens_to_ids("<s>")
    (ex,), _ = sft(tmp_path, tok, [{"prompt": "a", "completion": "b"}])
    assert ex.input_ids[0] == bos and ex.input_ids.count(bos) == 1
    assert spans(tok, ex) == [f"b{EOT}"]
    # Plain text has no template, so the tokenizer's own BOS is added once.
    (ex,), _ = sft(tmp_path, tok, [{"text": "a"}])
    assert ex.input_ids == [bos, *tok.convert_tokens_to_ids(["a", "<|im_end|>"])]


def test_template_that_rewrites_history_falls_back(tok: Any) -> None:
    # '!' only after the final message, so rendering a prefix does not give a prefix of the
    # whole chat (like Qwen3 dropping the think block of earlier turns).
    rewriting = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
        "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}"
        "{% if loop.last %}!{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    msgs = [
        {"role": "user", "content": "a"},
        {
            "role": "assistant",
            "content": "a",
        },  # same text as the user turn and inside "<|im_start|>"
        {"role": "user", "content": "v"},
        {"role": "assistant", "content": "b"},
    ]
    # 1) the template's {% generation %} marks: content + end-of-turn token.
    ex = tokenize_conversation(char_tokenizer(rewriting), msgs)
    assert spans(tok, ex) == ["a<|im_end|>", "b<|im_end|>"]
    # 2) no marks: the text that changes when a turn's content is swapped out is that turn.
    plain = rewriting.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    diffed = tokenize_conversation(char_tokenizer(plain), msgs)
    assert diffed.input_ids == ex.input_ids and diffed.labels == ex.labels
    # 3) a template that leaves earlier assistant turns out: nothing left to try.
    dropping = plain.replace(
        "{% if m['role'] == 'assistant' %}",
        "{% if m['role'] == 'assistant' and not loop.last %}{% elif m['role'] == 'assistant' %}",
    )
    with pytest.raises(UserError, match="cannot locate the assistant tokens"):
        tokenize_conversation(char_tokenizer(dropping), msgs)


# ---------------------------------------------------------------- detection and errors


def test_auto_detection_of_each_shape() -> None:
    cfg = DataConfig()
    chat = [{"role": "user", "content": "x"}]
    assert detect_format({"messages": chat}, cfg, source="s") == "messages"
    assert detect_format({"conversations": chat}, cfg, source="s") == "messages"
    share = [{"from": "human", "value": "x"}]
    assert detect_format({"conversations": share}, cfg, source="s") == "sharegpt"
    assert (
        detect_format({"instruction": "i", "input": "", "output": "o"}, cfg, source="s") == "alpaca"
    )
    assert detect_format({"question": "q", "answer": "#### 1"}, cfg, source="s") == "gsm8k"
    assert detect_format({"prompt": "p", "completion": "c"}, cfg, source="s") == "prompt_completion"
    assert detect_format({"text": "t"}, cfg, source="s") == "text"
    # The converted GSM8K rows of the Qwen1.5 scenario name their messages with prompt_key.
    assert (
        detect_format({"msgs": chat, "answer": "1"}, DataConfig(prompt_key="msgs"), source="s")
        == "messages"
    )
    with pytest.raises(UserError, match=r"s: cannot tell .*alpaca: .*sharegpt: .*gsm8k: "):
        detect_format({"foo": 1}, cfg, source="s")


def test_malformed_jsonl_names_the_line(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n', encoding="utf-8")
    cfg = DataConfig(train_file=str(path))
    with pytest.raises(UserError, match=rf"^data.train_file: {path} line 3: not valid JSON \("):
        load_rows(cfg, MiscConfig(), which="train")


def test_missing_field_names_the_row(tmp_path: Path, tok: Any) -> None:
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    with pytest.raises(UserError) as err:
        sft(tmp_path, tok, rows)
    # The message names the key, row, field, format, the shape it expects and the file.
    assert str(err.value) == (
        "data.train_file: row 2: missing field 'output' required by format 'alpaca', expected "
        f"{FORMAT_SHAPES['alpaca']} (in {tmp_path / 'train.jsonl'})"
    )


def test_missing_file_names_key_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match=rf"^data.train_file: {missing}: no such file"):
        load_rows(DataConfig(train_file=str(missing)), MiscConfig(), which="train")
    cfg = DataConfig(
        train_file=write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}]), eval_file=str(missing)
    )
    with pytest.raises(UserError, match=r"^data.eval_file: "):
        load_rows(cfg, MiscConfig(), which="eval")
    with pytest.raises(UserError, match="data.train_file .* or data.dataset_name"):
        load_rows(DataConfig(), MiscConfig(), which="train")


# ---------------------------------------------------------------- sources and splits


def test_test_size_split_is_deterministic_and_sized(tmp_path: Path) -> None:
    rows = [{"text": str(i)} for i in range(10)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)

    def split(test_size: float, seed: int = 0) -> tuple[list[int], list[int]]:
        cfg = DataConfig(train_file=path, test_size=test_size)
        train = load_rows(cfg, MiscConfig(), which="train", seed=seed)
        evals = load_rows(cfg, MiscConfig(), which="eval", seed=seed)
        return [int(r["text"]) for r in train], [int(r["text"]) for r in evals]

    train, evals = split(0.2)
    assert len(evals) == 2 and len(train) == 8  # round(0.2 * 10)
    assert sorted(train + evals) == list(range(10)) and train == sorted(train)
    assert split(0.2) == (train, evals)
    assert any(split(0.2, seed) != (train, evals) for seed in range(1, 6))
    assert len(split(3)[1]) == 3
    assert len(split(0.01)[1]) == 1  # a positive fraction never yields an empty eval set
    with pytest.raises(UserError, match="data.test_size: 2.5"):
        split(2.5)
    with pytest.raises(UserError, match="data.test_size: 10 eval rows leave no training rows"):
        split(10)
    assert load_rows(DataConfig(train_file=path), MiscConfig(), which="eval") == []
    capped = DataConfig(train_file=path, test_size=4, max_train_samples=3, max_eval_samples=2)
    assert len(load_rows(capped, MiscConfig(), which="train")) == 3
    assert len(load_rows(capped, MiscConfig(), which="eval")) == 2


def test_json_parquet_and_save_to_disk_sources(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "#### 2"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("list.json", "wrapped.json", "lines.json", "rows.parquet"):
        assert read_rows(str(tmp_path / name), "data.train_file") == rows, name

    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows),
            "test": datasets.Dataset.from_list([{"question": "t", "answer": "#### 0"}]),
        }
    ).save_to_disk(str(folder))
    cfg = DataConfig(train_file=str(folder), eval_split="test")
    assert load_rows(cfg, MiscConfig(), which="train") == rows
    assert load_rows(cfg, MiscConfig(), which="eval") == [{"question": "t", "answer": "#### 0"}]
    with pytest.raises(UserError, match=r"has no split 'dev'; it has \['test', 'train'\]"):
        load_rows(DataConfig(train_file=str(folder), split="dev"), MiscConfig(), which="train")
    single = DataConfig(train_file=str(tmp_path / "list.json"), eval_split="test")
    with pytest.raises(UserError, match="data.eval_split: .* single file"):
        load_rows(single, MiscConfig(), which="train")


def _fake_hub_cache(root: Path) -> None:
    """The folder layout datasets leaves after downloading 'user/toy' config 'main'."""
    import datasets

    target = root / "user___toy" / "main" / "0.0.0" / "abc123"
    target.mkdir(parents=True)
    for split, n in (("train", 3), ("test", 1)):
        ds = datasets.Dataset.from_list([{"text": f"{split}{i}"} for i in range(n)])
        ds.save_to_disk(str(root / "tmp" / split))
        shutil.copy(next((root / "tmp" / split).glob("*.arrow")), target / f"toy-{split}.arrow")
    splits = [
        {"name": s, "num_examples": n, "dataset_name": "toy"}
        for s, n in (("train", 3), ("test", 1))
    ]
    datasets.DatasetInfo(
        features=ds.features, config_name="main", dataset_name="toy", splits=splits
    ).write_to_directory(str(target))
    shutil.rmtree(root / "tmp")


def test_hub_dataset_only_from_local_cache(tmp_path: Path) -> None:
    import datasets.config

    _fake_hub_cache(tmp_path / "cache")
    misc = MiscConfig(huggingface_cache_dir=str(tmp_path / "cache"))
    cfg = DataConfig(dataset_name="user/toy", dataset_config="main", eval_split="test")
    assert load_rows(cfg, misc, which="train") == [{"text": f"train{i}"} for i in range(3)]
    assert load_rows(cfg, misc, which="eval") == [{"text": "test0"}]
    offline_before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(UserError, match=r"data.dataset_name: 'user/missing' .* not in the local"):
        load_rows(DataConfig(dataset_name="user/missing"), misc, which="train")
    assert datasets.config.HF_HUB_OFFLINE == offline_before  # the offline switch is restored


# ---------------------------------------------------------------- truncation, RL, conversion


def test_truncation_and_dropped_examples_are_counted(tmp_path: Path, tok: Any) -> None:
    rows = [
        {"prompt": "ab", "completion": "xyz"},  # "<|im_start|>user\nab<|im_end|>\n" = 1+5+2+2 = 10
        {"prompt": "abcdefghijklmnop", "completion": "z"},  # prompt alone is 1+5+16+2 = 24 tokens
    ]
    cfg = DataConfig(train_file=write_jsonl(tmp_path / "t.jsonl", rows), max_seq_length=23)
    train, _, stats = load_sft_data(cfg, MiscConfig(), tok)
    # Row 1: 10 + GEN (1 + 9 + 1 = 11) + "xyz" + END (2) = 26 tokens -> cut to 23, keeping "xy".
    assert [len(ex.input_ids) for ex in train] == [23]
    assert spans(tok, train[0]) == ["xy"]
    assert stats["num_truncated"] == 2 and stats["num_dropped_no_target"] == 1
    assert stats["num_train"] == 1 and stats["max_length"] == 23 and stats["mean_length"] == 23.0


def test_rl_prompts_gsm8k_with_system_prompt_and_template(tmp_path: Path, tok: Any) -> None:
    rows = [
        {"question": "1+1?", "answer": "2\n#### 2", "source": "toy"},
        {"question": "x" * 40, "answer": "#### 0", "source": "toy"},
    ]
    cfg = DataConfig(
        train_file=write_jsonl(tmp_path / "g.jsonl", rows),
        system_prompt="S",
        prompt_template="Q: {question} ({source})",
        max_prompt_length=45,
    )
    train, evals, stats = load_rl_data(cfg, MiscConfig(), tok)
    (ex,) = train
    assert ex.prompt_messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q: 1+1? (toy)"},
    ]
    assert ex.prompt_text == f"<|im_start|>system\nS{END}<|im_start|>user\nQ: 1+1? (toy){END}{GEN}"
    assert ex.prompt_ids == tok(ex.prompt_text, add_special_tokens=False)["input_ids"]
    assert ex.columns == {"source": "toy", "answer": "2\n#### 2"}
    # Row 1: system 1+7+1+2 = 11, user 1+5+13+2 = 21, GEN 11 -> 43 <= 45 tokens.
    # Row 2: 11 + (1+5+(3+40+6)+2 = 57) + 11 = 79 > 45, dropped.
    assert stats["num_dropped_too_long"] == 1 and stats["num_train"] == 1 and evals == []
    bad = DataConfig(train_file=cfg.train_file, prompt_template="{nope}")
    with pytest.raises(
        UserError, match="data.prompt_template: data.train_file: row 1 has no field 'nope'"
    ):
        load_rl_data(bad, MiscConfig(), tok)


def test_rl_prompt_drops_trailing_assistant_turn(tmp_path: Path, tok: Any) -> None:
    rows = [{"instruction": "say hi", "output": "hi"}]
    cfg = DataConfig(train_file=write_jsonl(tmp_path / "a.jsonl", rows))
    (ex,), _, _ = load_rl_data(cfg, MiscConfig(), tok)
    assert ex.prompt_messages == [{"role": "user", "content": "say hi"}]
    assert ex.columns == {"answer": "hi"}


def test_gsm8k_conversion_round_trip(tmp_path: Path, tok: Any) -> None:
    rows = [
        {"question": "2+3?", "answer": "2+3=5\n#### 5"},
        {"question": "1+0?", "answer": "#### 1"},
    ]
    src = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    assert FORMAT_CONVERTERS["gsm8k"] is convert_gsm8k_to_chat
    for out in ("chat.jsonl", "chat.parquet"):
        assert convert_gsm8k_to_chat(src, str(tmp_path / out)) == 2
        converted = read_rows(str(tmp_path / out), "data.train_file")
        assert converted[0] == {
            "messages": [{"role": "user", "content": "2+3?"}],
            "answer": "2+3=5\n#### 5",
        }
        # The converted file feeds RL exactly like the raw GSM8K rows (the Qwen1.5 scenario).
        via_chat, _, _ = load_rl_data(
            DataConfig(train_file=str(tmp_path / out), prompt_key="messages"), MiscConfig(), tok
        )
        via_raw, _, _ = load_rl_data(DataConfig(train_file=src), MiscConfig(), tok)
        assert [(e.prompt_ids, e.columns) for e in via_chat] == [
            (e.prompt_ids, e.columns) for e in via_raw
        ]
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}, {"question": "q"}])
    with pytest.raises(
        UserError, match=r"bad.jsonl: row 2: missing field 'answer' required by format 'gsm8k'"
    ):
        convert_gsm8k_to_chat(str(tmp_path / "bad.jsonl"), str(tmp_path / "o.jsonl"))
