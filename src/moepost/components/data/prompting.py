"""Prompt templates (generic ``{field}`` templates and translation prompts) and the clean-up of
translation completions before they are scored.

``postprocess_translation`` applies these rules, in order:

1. Reasoning: everything up to the last ``</think>`` is dropped (a chat template may open the
   ``<think>`` block in the prompt, so the completion can start inside it). A ``<think>`` that is
   never closed means the model ran out of tokens while reasoning: the result is "".
2. Chat wrapper: text after the first end-of-turn token (``<|im_end|>``, ``<|endoftext|>``,
   ``<end_of_turn>``, ``<|eot_id|>``, ``</s>``, ``<eos>``) is dropped, and a leading role header
   (``<|im_start|>assistant``, ``<start_of_turn>model``) is removed.
3. A leading label line or prefix is removed: "Translation:", "Korean translation:",
   "Translated text:", "Here is the translation:", "번역:", "번역문:", "翻訳:", "翻译:", "译文:"
   (with optional ``**bold**`` markers).
4. A trailing explanation is removed: from the first paragraph (after a blank line) that starts
   with "Note:", "Notes:", "Explanation:", "참고:", "설명:", "주의:", "注:" (either colon, optional
   ``**`` markers) or "("; it is cut only when some text remains before it.
5. Matching quotes around the whole text ("...", '...', “...”, ‘...’, «...», 「...」, 『...』) are
   removed when the quote character does not occur inside.
6. Surrounding whitespace is stripped.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from moepost.errors import UserError

LANGUAGE_NAMES: dict[str, str] = {
    "en": "English",
    "ko": "Korean",
    "ja": "Japanese",
    "zh": "Chinese",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "ru": "Russian",
    "vi": "Vietnamese",
    "th": "Thai",
    "id": "Indonesian",
    "ar": "Arabic",
    "hi": "Hindi",
}

DEFAULT_TRANSLATION_TEMPLATE = (
    "Translate the following {source_lang} text into {target_lang}. "
    "Output only the {target_lang} translation, without explanations, notes or quotes.\n\n"
    "{source_lang} text:\n{source_text}"
)


def apply_prompt_template(template: str, row: Mapping[str, Any]) -> str:
    """``template.format(**row)``: ``{field}`` takes the value of the row's column ``field``.

    Literal braces are written ``{{`` and ``}}``. A field that is not in the row raises a
    UserError listing the available columns.
    """
    fields = []
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UserError(
            f"prompt template {template[:60]!r}: {exc} (write literal braces as {{{{ and }}}})"
        ) from exc
    for field_name in fields:
        if field_name == "" or field_name.isdigit():
            raise UserError(
                f"prompt template {template[:60]!r}: positional field {{{field_name}}} is not "
                f"supported; name a column, e.g. {{question}}"
            )
        key = re.split(r"[.\[]", field_name, maxsplit=1)[0]
        if key not in row:
            raise UserError(
                f"prompt template field {{{key}}} is not a column of the data; "
                f"available: {', '.join(sorted(map(str, row))) or '(none)'}"
            )
    return template.format_map(row)


def language_name(code_or_name: str) -> str:
    """'ko' -> 'Korean'; anything not in LANGUAGE_NAMES ('Korean', 'pt-BR') is returned as is."""
    return LANGUAGE_NAMES.get(code_or_name.strip().lower(), code_or_name.strip())


def build_translation_prompt(
    source_text: str, source_lang: str, target_lang: str, *, template: str | None = None
) -> str:
    """The instruction to translate ``source_text``; language codes become names ('ko' ->
    'Korean'). A custom ``template`` may use {source_text}, {source_lang}, {target_lang}."""
    row = {
        "source_text": source_text,
        "source_lang": language_name(source_lang),
        "target_lang": language_name(target_lang),
    }
    return apply_prompt_template(template or DEFAULT_TRANSLATION_TEMPLATE, row)


def build_translation_messages(
    source_text: str,
    source_lang: str,
    target_lang: str,
    *,
    template: str | None = None,
    system_prompt: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages for the tokenizer's chat template: an optional system turn, then the user
    turn holding :func:`build_translation_prompt`."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    prompt = build_translation_prompt(source_text, source_lang, target_lang, template=template)
    messages.append({"role": "user", "content": prompt})
    return messages


_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "</s>", "<eos>")
_ROLE_HEADER_RE = re.compile(
    r"^\s*(?:<\|im_start\|>\s*assistant|<start_of_turn>\s*model|<\|im_start\|>)\s*", re.I
)
_LABEL_RE = re.compile(
    r"^\s*(?:\*\*)?(?:"
    r"(?:here\s+is|here's)\b[^\n:]*\btranslation\b[^\n:]*"
    r"|(?:[A-Za-z]+\s+)?translation|translated\s+text"
    r"|번역(?:문|본|\s*결과)?|翻訳|翻译|译文"
    r")\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*",
    re.I,
)
_TRAILER_RE = re.compile(
    r"\n\s*\n\s*(?:\*{0,2}(?:notes?|explanation|참고|설명|주의|注)\s*(?:\*\*)?\s*[:：]|\()",
    re.I,
)
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "「": "」", "『": "』"}


def _strip_reasoning(text: str) -> str:
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return ""
    return text


def _strip_chat_wrapper(text: str) -> str:
    cut = min((i for i in (text.find(t) for t in _END_TOKENS) if i >= 0), default=len(text))
    return _ROLE_HEADER_RE.sub("", text[:cut], count=1)


def _strip_quotes(text: str) -> str:
    if len(text) >= 2 and text[0] in _QUOTE_PAIRS:
        close = _QUOTE_PAIRS[text[0]]
        inner = text[1:-1]
        if text[-1] == close and text[0] not in inner and close not in inner:
            return inner.strip()
    return text


def postprocess_translation(completion: str) -> str:
    """The bare translation in a completion; see the module docstring for the rules."""
    text = _strip_chat_wrapper(_strip_reasoning(completion)).strip()
    text = _LABEL_RE.sub("", text, count=1).strip()
    trailer = _TRAILER_RE.search(text)
    if trailer and text[: trailer.start()].strip():
        text = text[: trailer.start()].strip()
    return _strip_quotes(text).strip()
