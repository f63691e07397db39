"""`data.prompt_template`: a named chat format, or a template for the first user turn.

Seed pipelines write ``prompt_template: qwen`` (with ``chat_format: chatml``) to mean "Qwen's
chat format". moepost always renders conversations with the tokenizer's own chat template, so a
name here is a check, not a rewrite: the tokenizer's template must be that format, else the run
stops with an error. A string that is not a name must hold at least one ``{field}`` placeholder
(``{content}``: the user turn the data format built; ``{column}``: a column of the row) and
rewrites the first user turn; a string with neither is an error, never the new user text.

This module also refuses text that would not reach the tokens as written: a tokenizer control
token (``<|im_start|>``) inside a row's text is tokenized as that control token, and characters
the tokenizer cannot represent become its unknown token.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import Any

from moepost.errors import UserError

# name -> (format, a marker its rendered user turn always contains)
_CHATML = ("ChatML", "<|im_start|>")
_LLAMA3 = ("Llama 3", "<|start_header_id|>")
_GEMMA = ("Gemma", "<start_of_turn>")
_MISTRAL = ("Mistral / Llama 2 [INST]", "[INST]")
_DEEPSEEK = ("DeepSeek-V3", "<\uff5cUser\uff5c>")
CHAT_FORMATS: dict[str, tuple[str, str]] = {
    "chatml": _CHATML,
    "qwen": _CHATML,
    "qwen2": _CHATML,
    "qwen2.5": _CHATML,
    "qwen3": _CHATML,
    "qwen3.5": _CHATML,
    "llama3": _LLAMA3,
    "llama-3": _LLAMA3,
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "mistral": _MISTRAL,
    "mixtral": _MISTRAL,
    "llama2": _MISTRAL,
    "deepseek": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
}


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of a template; positional or dotted fields are errors."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UserError(
            f"data.prompt_template = {template[:60]!r}: {exc} (write literal braces as {{{{ }}}})"
        ) from None
    fields = [f for _, f, _, _ in parsed if f is not None]
    for name in fields:
        if not name.isidentifier():
            raise UserError(
                f"data.prompt_template = {template[:60]!r}: field {{{name}}} must name a column "
                "or {content}, e.g. '{content}\\nThink step by step.'"
            )
    return fields


def chat_format_name(template: str | None) -> str | None:
    """The chat format ``template`` names ('qwen' -> 'qwen'), None for a ``{field}`` template.

    Raises UserError for a string that is neither, naming the valid values.
    """
    if template is None:
        return None
    if template.strip().lower() in CHAT_FORMATS:
        return template.strip().lower()
    if not template_fields(template):
        raise UserError(
            f"data.prompt_template = {template[:60]!r}: not a chat format name "
            f"({', '.join(CHAT_FORMATS)}) and no {{content}} / {{column}} placeholder; a "
            "template without one would replace every user turn with this text"
        )
    return None


def check_chat_format(tokenizer: Any, name: str) -> None:
    """The tokenizer's chat template must render the format ``name`` stands for."""
    label, marker = CHAT_FORMATS[name]
    probe = [{"role": "user", "content": "x"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except ValueError:
        rendered = None
    if rendered is None or marker not in rendered:
        shown = "has no chat template" if rendered is None else f"renders {rendered[:60]!r}"
        raise UserError(
            f"data.prompt_template = {name!r} names the {label} chat format, but the tokenizer "
            f"{shown}; moepost always uses the tokenizer's chat template, so drop "
            "data.prompt_template or use a tokenizer whose template is that format"
        )


class TextGuard:
    """Refuses row text that the tokenizer would not keep as written."""

    def __init__(self, tokenizer: Any) -> None:
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials |= {t.content for t in added.values() if getattr(t, "special", False)}
        ordered = sorted((s for s in specials if s), key=len, reverse=True)
        self.control = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self.tokenizer = tokenizer
        unk = getattr(tokenizer, "unk_token_id", None)
        # GPT-2 style tokenizers name EOS as their unknown token too: the templates' own EOS
        # would look like lost text, and such byte-level tokenizers have no unknown text.
        others = {getattr(tokenizer, f"{n}_token_id", None) for n in ("eos", "pad", "bos")}
        self.unk_id = None if unk in others else unk

    def check_text(self, texts: Iterable[str], where: str) -> None:
        for text in texts:
            found = self.control.search(text) if self.control else None
            if found:
                raise UserError(
                    f"{where}: the text contains {found.group(0)!r}, a control token of the "
                    "tokenizer; it would be read as that token, not as text. Remove or escape it "
                    "in the data"
                )

    def check_ids(self, ids: list[int], texts: Iterable[str], where: str) -> None:
        """``ids`` hold the unknown token: name the characters that became it."""
        if self.unk_id is None or self.unk_id not in ids:
            return
        lost = sorted(
            {
                ch
                for text in texts
                for ch in text
                if self.unk_id in self.tokenizer(ch, add_special_tokens=False)["input_ids"]
            }
        )
        raise UserError(
            f"{where}: the tokenizer cannot represent {''.join(lost)[:20]!r} (it becomes "
            f"{self.tokenizer.unk_token!r}); use a tokenizer that covers this text or clean the data"
        )
