"""Row shapes users bring (chat messages, alpaca, sharegpt, prompt/completion, plain text, GSM8K)
turned into one form, a conversation (list of {role, content}) plus the row's other columns,
and a conversation turned into token ids with labels on the assistant turns only.

Field names follow the pipelines in ../shared/scenarios: alpaca `instruction/input/output`,
sharegpt `conversations: [{from, value}]`, GSM8K `question/answer` with `#### N`.
`data.prompt_key` / `data.answer_key` / `data.messages_key` rename the fields a format reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from moepost.components.data.chat_formats import chat_format_name, template_fields
from moepost.config.schema import DataConfig
from moepost.errors import UserError

# Each message: role and content (str), plus any other key the row's message had.
Conversation = list[dict[str, Any]]

FORMAT_SHAPES: dict[str, str] = {
    "messages": "{'messages': [{'role': 'user', 'content': ...}, ...]} (or 'conversations')",
    "alpaca": "{'instruction': ..., 'input': ... (optional), 'output': ..., 'system': ... (optional)}",
    "sharegpt": "{'conversations': [{'from': 'human'|'gpt'|'system', 'value': ...}, ...]}",
    "prompt_completion": "{'prompt': str or messages list, 'completion': ...}",
    "text": "{'text': ...} (loss on every token)",
    "gsm8k": "{'question': ..., 'answer': '... #### N'}",
}

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


@dataclass
class Record:
    """One normalised row.

    messages: the conversation; empty for format 'text'.
    text: the raw text, only for format 'text'.
    columns: the row's fields the format did not consume, plus 'answer' (the reference a reward
        compares against) when the row has one: the answer_key column, GSM8K's answer, or the
        final assistant turn (alpaca output, completion).
    """

    messages: Conversation
    text: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "data.train_file: row 3", for errors found later (tokenization)
    # The row gave its prompt as messages (TRL's "conversational" data): rewards then get
    # message lists, as TRL passes them.
    conversational: bool = False


def _shape_list() -> str:
    return "; ".join(f"{name}: {shape}" for name, shape in FORMAT_SHAPES.items())


def _is_role_content_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and isinstance(value[0], dict)
        and "role" in value[0]
        and "content" in value[0]
    )


def _is_from_value_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and isinstance(value[0], dict)
        and "from" in value[0]
        and "value" in value[0]
    )


def detect_format(row: dict[str, Any], cfg: DataConfig, *, source: str) -> str:
    """The format named by `data.format`, or the one the first row's keys match when 'auto'."""
    if cfg.format != "auto":
        return cfg.format
    for key in (cfg.messages_key, cfg.prompt_key, "messages", "conversations"):
        if key is None or key not in row:
            continue
        if _is_role_content_list(row[key]):
            return "messages"
        if _is_from_value_list(row[key]):
            return "sharegpt"
    if (cfg.prompt_key or "instruction") in row and (cfg.answer_key or "output") in row:
        return "alpaca"
    if (cfg.prompt_key or "question") in row and (cfg.answer_key or "answer") in row:
        return "gsm8k"
    if (cfg.prompt_key or "prompt") in row:
        return "prompt_completion"
    if "instruction" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    raise UserError(
        f"{source}: cannot tell the data format from the first row's keys {sorted(row)}; "
        f"set data.format (and data.prompt_key / data.answer_key) to one of: {_shape_list()}"
    )


def _text(value: Any, where: str) -> str:
    """Message content as a string; multimodal part lists keep their text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and "text" in p for p in value):
        return "".join(str(p["text"]) for p in value)
    if isinstance(value, (int, float)):
        return str(value)
    raise UserError(f"{where}: expected text, got {type(value).__name__}")


def _extra_keys(msg: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    """A message's other keys (reasoning_content, name, tool_calls, ...), passed on to the chat
    template as they are: templates that know them render them, none is dropped here."""
    return {k: v for k, v in msg.items() if k not in used}


def _optional_text(value: Any, where: str) -> str:
    return "" if value is None else _text(value, where)


class _RowReader:
    """Reads the fields of one row, naming source and row number in every error."""

    def __init__(self, row: dict[str, Any], fmt: str, source: str, number: int) -> None:
        self.row, self.fmt, self.where = row, fmt, f"{source}: row {number}"
        self.consumed: set[str] = set()

    def get(self, key: str, *, required: bool) -> Any:
        value = self.row.get(key)
        if value is None and required:
            raise UserError(
                f"{self.where}: missing field '{key}' required by format '{self.fmt}', "
                f"expected {FORMAT_SHAPES.get(self.fmt, 'see data.format')}"
            )
        self.consumed.add(key)
        return value

    def messages(self, value: Any, key: str, *, sharegpt: bool) -> Conversation:
        if not isinstance(value, list) or not value:
            raise UserError(f"{self.where}: field '{key}' must be a non-empty list of messages")
        out: Conversation = []
        for i, msg in enumerate(value):
            where = f"{self.where}: {key}[{i}]"
            if not isinstance(msg, dict):
                raise UserError(f"{where}: expected an object, got {type(msg).__name__}")
            if sharegpt and "from" in msg:
                role = _SHAREGPT_ROLES.get(str(msg["from"]).lower())
                if role is None:
                    raise UserError(
                        f"{where}: unknown speaker {msg['from']!r}; expected one of "
                        f"{sorted(_SHAREGPT_ROLES)}"
                    )
                content = _text(msg.get("value"), where)
                out.append(
                    {**_extra_keys(msg, ("from", "value")), "role": role, "content": content}
                )
            elif "role" in msg and "content" in msg:
                content = _text(msg["content"], where)
                role = str(msg["role"])
                out.append(
                    {**_extra_keys(msg, ("role", "content")), "role": role, "content": content}
                )
            else:
                wanted = "'from' and 'value'" if sharegpt else "'role' and 'content'"
                raise UserError(f"{where}: a message needs {wanted}, got keys {sorted(msg)}")
        return out

    def columns(self) -> dict[str, Any]:
        return {k: v for k, v in self.row.items() if k not in self.consumed}


def _conversation(r: _RowReader, cfg: DataConfig, need_target: bool) -> tuple[Conversation, Any]:
    """The row's conversation and its reference answer (None when it has none)."""
    fmt = r.fmt
    if fmt in ("messages", "sharegpt"):
        default = "messages" if fmt == "messages" else "conversations"
        key = cfg.messages_key or cfg.prompt_key or default
        if fmt == "messages" and key not in r.row and "conversations" in r.row:
            key = "conversations"
        msgs = r.messages(r.get(key, required=True), key, sharegpt=fmt == "sharegpt")
        return msgs, None
    if fmt == "alpaca":
        instruction = _text(r.get(cfg.prompt_key or "instruction", required=True), r.where)
        # An empty input or system adds nothing; any other value (0 too) is kept as text.
        extra = _optional_text(r.get("input", required=False), r.where)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        system = _optional_text(r.get("system", required=False), r.where)
        answer = r.get(cfg.answer_key or "output", required=need_target)
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": user})
        return msgs, answer
    if fmt == "prompt_completion":
        key = cfg.prompt_key or "prompt"
        prompt = r.get(key, required=True)
        if isinstance(prompt, list):
            msgs = r.messages(prompt, key, sharegpt=False)
        else:
            msgs = [{"role": "user", "content": _text(prompt, r.where)}]
        return msgs, r.get(cfg.answer_key or "completion", required=need_target)
    if fmt == "gsm8k":
        question = _text(r.get(cfg.prompt_key or "question", required=True), r.where)
        answer = r.get(cfg.answer_key or "answer", required=True)
        return [{"role": "user", "content": question}], answer
    raise UserError(f"data.format: unknown format {fmt!r}; expected one of {sorted(FORMAT_SHAPES)}")


def _apply_prompt_template(
    msgs: Conversation, row: dict[str, Any], template: str, where: str
) -> None:
    """Rewrite the first user message from `data.prompt_template`.

    The template sees the row's fields and `{content}` (the user message the format built), so
    "{question}\\nAnswer with #### N." and "{content}\\nThink step by step." both work.
    """
    user = next((m for m in msgs if m["role"] == "user"), None)
    if user is None:
        raise UserError(f"{where}: data.prompt_template needs a user message, the row has none")
    template_fields(template)  # plain {name} fields only: no attribute or index look-ups
    fields = {k: v for k, v in row.items() if isinstance(v, (str, int, float))}
    fields["content"] = user["content"]
    try:
        user["content"] = template.format_map(fields)
    except KeyError as e:
        raise UserError(
            f"data.prompt_template: {where} has no field {e.args[0]!r} (fields: {sorted(fields)})"
        ) from None
    except (ValueError, IndexError) as e:
        raise UserError(f"data.prompt_template: not a valid format string ({e})") from None


def normalize_row(
    row: dict[str, Any],
    fmt: str,
    cfg: DataConfig,
    *,
    source: str,
    number: int,
    need_target: bool,
) -> Record:
    """One raw row -> Record, applying `data.system_prompt` and `data.prompt_template`.

    need_target: SFT needs the assistant side (alpaca output, completion); RL does not, except
        GSM8K whose answer is the reward's reference.
    number: the 1-based row number used in error messages.
    """
    r = _RowReader(row, fmt, source, number)
    named_format = chat_format_name(cfg.prompt_template)  # None: a {field} template, or none
    if fmt == "text":
        # SFT tokenizes plain text as is (no chat template), and a {field} template has no
        # user turn to rewrite: either setting would be silently ignored.
        if cfg.prompt_template is not None and (need_target or named_format is None):
            raise UserError(
                f"data.prompt_template = {cfg.prompt_template[:40]!r} does not apply to "
                "data.format=text (plain text is tokenized as written); remove it"
            )
        text = _text(r.get(cfg.prompt_key or "text", required=True), r.where)
        return Record(messages=[], text=text, columns=r.columns(), where=r.where)
    msgs, answer = _conversation(r, cfg, need_target)
    if cfg.prompt_template is not None and named_format is None:
        _apply_prompt_template(msgs, row, cfg.prompt_template, r.where)
    if answer is not None and not isinstance(answer, list):
        msgs.append({"role": "assistant", "content": _text(answer, r.where)})
    elif isinstance(answer, list):  # a completion given as messages
        msgs.extend(r.messages(answer, cfg.answer_key or "completion", sharegpt=False))
    # A system message in the row is more specific than the config-wide one.
    if cfg.system_prompt and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": cfg.system_prompt})
    columns = r.columns()
    if cfg.answer_key and fmt in ("messages", "sharegpt"):
        if row.get(cfg.answer_key) is None:
            raise UserError(f"{r.where}: missing field '{cfg.answer_key}' named by data.answer_key")
        columns["answer"] = row[cfg.answer_key]
    elif answer is not None and "answer" not in columns:
        columns["answer"] = answer if isinstance(answer, str) else msgs[-1]["content"]
    prompt = row.get(cfg.prompt_key or "prompt")
    conversational = fmt in ("messages", "sharegpt") or (
        fmt == "prompt_completion" and isinstance(prompt, list)
    )
    return Record(messages=msgs, columns=columns, where=r.where, conversational=conversational)


def split_prompt(messages: Conversation) -> tuple[Conversation, str | None]:
    """The prompt (everything before a trailing assistant turn) and that turn's text, if any."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


# ---------------------------------------------------------------- chat -> tokens with labels

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    eos_token: str | None
    eos_token_id: int | None
    chat_template: str | None

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # input_ids on trained tokens, IGNORE_INDEX elsewhere (unshifted)


def render_chat(
    tokenizer: Tokenizer, messages: Conversation, *, add_generation_prompt: bool
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except ValueError as e:  # no chat_template on the tokenizer
        raise UserError(
            f"model.tokenizer_name_or_path: the tokenizer cannot render chat messages ({e}); "
            "use a tokenizer with a chat template or data.format=text"
        ) from None


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of rendered text; the chat template already wrote any BOS, so add none."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _labels_from_generation_tags(tokenizer: Tokenizer, messages: Conversation) -> list[int] | None:
    """Labels from the template's own `{% generation %}` marks, when it has them."""
    if not _GENERATION_TAG.search(tokenizer.chat_template or ""):
        return None
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = list(out["assistant_masks"])
    return [t if m else IGNORE_INDEX for t, m in zip(out["input_ids"], mask)] if any(mask) else None


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _labels_by_diff(tokenizer: Tokenizer, messages: Conversation, text: str) -> list[int] | None:
    """Labels found by re-rendering with each assistant content swapped for a sentinel.

    The part of the rendered text that changes is that turn's content as the template writes
    it (Qwen3, say, drops the think block of earlier turns), wherever the template puts it.
    The end-of-turn token right after it is trained too, so the model learns to stop.
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow tokenizers have no character offsets
        return None
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant" or not msg["content"]:
            continue
        swapped = [*messages[:k], {**msg, "content": "\x00"}, *messages[k + 1 :]]
        other = render_chat(tokenizer, swapped, add_generation_prompt=False)
        start = _common_prefix(text, other)
        end = len(text) - _common_prefix(text[start:][::-1], other[start:][::-1])
        if end <= start:  # the template does not write this turn at all
            return None
        if tokenizer.eos_token and text.startswith(tokenizer.eos_token, end):
            end += len(tokenizer.eos_token)
        first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
        if first is None or last is None:
            return None
        labels[first : last + 1] = ids[first : last + 1]
    return labels


def tokenize_conversation(tokenizer: Tokenizer, messages: Conversation) -> SFTExample:
    """input_ids of the whole chat, with labels only on assistant turns.

    Works for any template by rendering prefixes: for assistant turn k, the tokens of
    messages[:k] with the generation prompt are what the model sees, and the tokens of
    messages[:k+1] minus those are the turn itself; labels cover it up to its last EOS token
    (content + end-of-turn), or all of it when it has none. When a template renders a turn differently once later turns
    follow, the template's `{% generation %}` marks are used, else `_labels_by_diff`.
    """
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    full_ids = encode(tokenizer, text)
    labels = [IGNORE_INDEX] * len(full_ids)
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = encode(tokenizer, render_chat(tokenizer, messages[:k], add_generation_prompt=True))
        upto = encode(
            tokenizer, render_chat(tokenizer, messages[: k + 1], add_generation_prompt=False)
        )
        if upto[: len(prefix)] != prefix or full_ids[: len(upto)] != upto:
            fallback = _labels_from_generation_tags(tokenizer, messages)
            if fallback is None:
                fallback = _labels_by_diff(tokenizer, messages, text)
            if fallback is None or len(fallback) != len(full_ids):
                raise UserError(
                    "model.tokenizer_name_or_path: cannot locate the assistant tokens under this "
                    "chat template (it rewrites earlier turns, has no {% generation %} marks, and "
                    "leaves some assistant turn out); use data.format=text or a template with "
                    "{% generation %} marks"
                )
            return SFTExample(full_ids, fallback)
        end = len(upto)
        # Stop at the end-of-turn token like the other two methods: what follows it (a newline)
        # is never generated, the model stops at EOS.
        if tokenizer.eos_token_id in upto[len(prefix) :]:
            end = len(upto) - upto[::-1].index(tokenizer.eos_token_id)
        labels[len(prefix) : end] = upto[len(prefix) : end]
    return SFTExample(full_ids, labels)


def tokenize_text(tokenizer: Tokenizer, text: str) -> SFTExample:
    """Plain text: the tokenizer's own special tokens (BOS if it has one) plus EOS; loss everywhere."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return SFTExample(ids, list(ids))
