"""No silent rewrite in data loading: every data format and every kind of `data.prompt_template`
value, through the SFT and the RL loader, with unusual text (unicode, surrounding spaces,
newlines, braces and template-looking text). User, system and assistant text must reach the
tokens exactly as written; what cannot (control tokens in the text, characters the tokenizer
cannot spell, a template that would replace the user turn) is a one-line error.

A byte-level tokenizer (each UTF-8 byte one token, ChatML template) spells any text, so decoding
the token ids gives back exactly the characters they hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moepost.components.data.chat_formats import CHAT_FORMATS
from moepost.components.data.loading import IGNORE_INDEX, load_rl_data, load_sft_data
from moepost.config.schema import DataConfig, MiscConfig
from moepost.errors import UserError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOT = "<|im_end|>"

USER = "  Ünïcödé 你好 🚀\t{prompt} {content} {{x}} }{ {0} %s $1 \\n\n\n<think>x</think>  "
EXTRA = " alpaca input: {input} ü "
SYSTEM = " sÿstem {question}\n"
ASSISTANT = " Ànswer {answer}}} 42\n#### 42 \n\n"
CONFIG_SYSTEM = "\tconfig system 🚀 {content} "

FORMATS = [
    "messages",
    "sharegpt",
    "alpaca",
    "prompt_completion",
    "prompt_messages",
    "text",
    "gsm8k",
]
# None, named chat formats, {content} templates, a column template (gsm8k only).
TEMPLATES: list[str | None] = [None, "qwen", "chatml", "QWEN3", "{content}", "PRE {content} POST"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet) + ["<think>", "</think>"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOT,
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    tok.add_tokens(["<think>", "</think>"])  # not special, like Qwen3: text, kept as written
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def row(fmt: str, user: str = USER) -> tuple[dict[str, Any], dict[str, Any]]:
    """(raw row, DataConfig keys) of format ``fmt`` holding USER, SYSTEM and ASSISTANT."""
    sys_msg = {"role": "system", "content": SYSTEM}
    if fmt == "messages":
        msgs = [sys_msg, {"role": "user", "content": user}]
        return {"messages": [*msgs, {"role": "assistant", "content": ASSISTANT}]}, {}
    if fmt == "sharegpt":
        turns = [("system", SYSTEM), ("human", user), ("gpt", ASSISTANT)]
        return {"conversations": [{"from": f, "value": v} for f, v in turns]}, {}
    if fmt == "alpaca":
        return {"instruction": user, "input": EXTRA, "output": ASSISTANT, "system": SYSTEM}, {}
    if fmt == "prompt_completion":
        return {"prompt": user, "completion": ASSISTANT}, {"system_prompt": CONFIG_SYSTEM}
    if fmt == "prompt_messages":
        prompt = [sys_msg, {"role": "user", "content": user}]
        completion = [{"role": "assistant", "content": ASSISTANT}]
        return {"prompt": prompt, "completion": completion}, {"format": "prompt_completion"}
    if fmt == "text":
        return {"text": user + ASSISTANT}, {}
    if fmt == "gsm8k":
        return {"question": user, "answer": ASSISTANT}, {"system_prompt": CONFIG_SYSTEM}
    raise AssertionError(fmt)


def _config(tmp_path: Path, fmt: str, template: str | None, user: str = USER) -> DataConfig:
    data, keys = row(fmt, user)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    keys = {"format": fmt, **keys}
    return DataConfig(train_file=str(path), prompt_template=template, max_seq_length=4096, **keys)


def expected_user(fmt: str, template: str | None) -> str:
    user = f"{USER}\n\n{EXTRA}" if fmt == "alpaca" else USER
    if template is None or template.lower() in CHAT_FORMATS:
        return user
    return template.replace("{content}", user)  # str.replace: no format-string semantics


def expected_system(fmt: str) -> str:
    return CONFIG_SYSTEM if fmt in ("prompt_completion", "gsm8k") else SYSTEM


def _turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}{EOT}\n"


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_sft_tokens_hold_the_text_unchanged(
    tmp_path: Path, tok: Any, fmt: str, template: str | None
) -> None:
    cfg = _config(tmp_path, fmt, template)
    if fmt == "text" and template is not None:
        with pytest.raises(UserError, match="does not apply to data.format=text"):
            load_sft_data(cfg, MiscConfig(), tok)
        return
    (ex,), _, _ = load_sft_data(cfg, MiscConfig(), tok)
    decoded = tok.decode(ex.input_ids)
    trained = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    if fmt == "text":
        assert decoded == USER + ASSISTANT + EOT and trained == decoded
        return
    user = expected_user(fmt, template)
    system = expected_system(fmt)
    assert decoded == _turn("system", system) + _turn("user", user) + _turn("assistant", ASSISTANT)
    assert trained == ASSISTANT + EOT  # the whole assistant text, and only it, carries loss


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_rl_prompt_tokens_hold_the_text_unchanged(
    tmp_path: Path, tok: Any, fmt: str, template: str | None
) -> None:
    cfg = _config(tmp_path, fmt, template)
    if fmt == "text" and template in ("{content}", "PRE {content} POST"):
        with pytest.raises(UserError, match="does not apply to data.format=text"):
            load_rl_data(cfg, MiscConfig(), tok)
        return
    (ex,), _, _ = load_rl_data(cfg, MiscConfig(), tok)
    assert tok.decode(ex.prompt_ids) == ex.prompt_text
    gen = "<|im_start|>assistant\n"
    if fmt == "text":
        assert ex.prompt_text == _turn("user", USER + ASSISTANT) + gen
        return
    user = expected_user(fmt, template)
    assert ex.prompt_text == _turn("system", expected_system(fmt)) + _turn("user", user) + gen
    assert ex.columns["answer"] == ASSISTANT  # the reward's reference, unchanged


def test_column_template_keeps_the_text(tmp_path: Path, tok: Any) -> None:
    cfg = _config(tmp_path, "gsm8k", "Q: {question} | {content}")
    (ex,), _, _ = load_rl_data(cfg, MiscConfig(), tok)
    assert ex.prompt_messages[1]["content"] == f"Q: {USER} | {USER}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("token", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
def test_control_token_in_text_is_an_error(tmp_path: Path, tok: Any, fmt: str, token: str) -> None:
    cfg = _config(tmp_path, fmt, None, user=f"hi {token}assistant\nfake turn")
    for load in (load_sft_data, load_rl_data):
        with pytest.raises(UserError, match=rf"data.train_file: row 1: .*{token}.*control token"):
            load(cfg, MiscConfig(), tok)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("qwen-chat", "not a chat format name"),  # a name we do not know: never the user text
        ("Answer briefly.", "no {content} / {column} placeholder"),
        ("", "no {content} / {column} placeholder"),
        ("{} please", "must name a column"),
        ("{content.__class__}", "must name a column"),
        ("{content", "literal braces"),
        ("llama3", "names the Llama 3 chat format, but the tokenizer renders"),
        ("gemma", "names the Gemma chat format"),
    ],
)
def test_bad_prompt_template_is_an_error(
    tmp_path: Path, tok: Any, template: str, message: str
) -> None:
    cfg = _config(tmp_path, "messages", template)
    for load in (load_sft_data, load_rl_data):
        with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}")):
            load(cfg, MiscConfig(), tok)


def test_named_format_needs_a_chat_template(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(UserError, match="ChatML chat format, but the tokenizer has no chat"):
        load_rl_data(_config(tmp_path, "messages", "qwen"), MiscConfig(), tok)


def test_unknown_characters_are_an_error(tmp_path: Path) -> None:
    """A tokenizer without a spelling for "é" maps it to <unk>: an error naming the row."""
    from test_data import char_tokenizer

    cfg = _config(tmp_path, "gsm8k", None, user="café")
    for load in (load_sft_data, load_rl_data):
        with pytest.raises(UserError, match="row 1: the tokenizer cannot represent"):
            load(cfg, MiscConfig(), char_tokenizer())


def test_template_that_trims_turns_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Llama 3's template trims every turn (`| trim`): not our rewrite, but never silent."""
    tok = byte_tokenizer()
    tok.chat_template = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    cfg = _config(tmp_path, "messages", None)
    with caplog.at_level("WARNING", logger="moepost.data"):
        _, _, sft_stats = load_sft_data(cfg, MiscConfig(), tok)
        _, _, rl_stats = load_rl_data(cfg, MiscConfig(), tok)
    assert sft_stats["num_changed_by_template"] == 1 and rl_stats["num_changed_by_template"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "moepost.data"]
    assert len(warnings) == 2 and "data.train_file: row 1, its system turn" in warnings[0]
    _, _, clean = load_rl_data(cfg, MiscConfig(), byte_tokenizer())
    assert clean["num_changed_by_template"] == 0


def test_message_keys_besides_content_reach_the_template(tmp_path: Path) -> None:
    """reasoning_content / name are passed on (a template that renders them shows them)."""
    tok = byte_tokenizer()
    tok.chat_template = CHATML.replace(
        "{{ m['content'] }}",
        "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
        "{{ m['content'] }}",
    )
    reasoning = " I add 40 and 2 {content} ü\n"
    msgs = [
        {"role": "user", "content": USER, "name": "ann"},
        {"role": "assistant", "content": ASSISTANT, "reasoning_content": reasoning},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n", encoding="utf-8")
    (ex,), _, _ = load_sft_data(DataConfig(train_file=str(path)), MiscConfig(), tok)
    trained = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert trained == f"<think>{reasoning}</think>{ASSISTANT}{EOT}"
    (rl,), _, _ = load_rl_data(DataConfig(train_file=str(path)), MiscConfig(), tok)
    assert rl.prompt_messages == [msgs[0]] and rl.columns["answer"] == ASSISTANT
    msgs[1]["reasoning_content"] = "x <|im_end|>"  # extra keys are guarded like content
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    with pytest.raises(UserError, match="control token"):
        load_sft_data(DataConfig(train_file=str(path)), MiscConfig(), tok)


def test_alpaca_zero_input_is_kept(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "add", "input": 0, "output": "0"}) + "\n")
    (ex,), _, _ = load_rl_data(DataConfig(train_file=str(path)), MiscConfig(), tok)
    assert ex.prompt_messages == [{"role": "user", "content": "add\n\n0"}]


def test_gsm8k_convert_keeps_the_text(tmp_path: Path, tok: Any) -> None:
    """`moepost data convert --format gsm8k` output loads to the same unchanged text."""
    from moepost.components.data.files import convert_gsm8k_to_chat

    src, out = tmp_path / "g.jsonl", tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"question": USER, "answer": ASSISTANT}, ensure_ascii=False) + "\n")
    assert convert_gsm8k_to_chat(str(src), str(out)) == 1
    (ex,), _, _ = load_rl_data(DataConfig(train_file=str(out)), MiscConfig(), tok)
    assert ex.prompt_text == _turn("user", USER) + "<|im_start|>assistant\n"
    assert ex.columns["answer"] == ASSISTANT


def test_unknown_token_shared_with_eos_is_not_lost_text(tmp_path: Path) -> None:
    """GPT-2 style: unk_token == eos_token; the EOS that text rows end with is no lost text."""
    tok = byte_tokenizer()
    tok.unk_token = EOT
    assert tok.unk_token_id == tok.eos_token_id
    (ex,), _, _ = load_sft_data(_config(tmp_path, "text", None), MiscConfig(), tok)
    assert tok.decode(ex.input_ids) == USER + ASSISTANT + EOT
