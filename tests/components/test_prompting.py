"""Prompt templates and the clean-up of translation completions."""

from __future__ import annotations

import pytest

from moepost.components.data.prompting import (
    apply_prompt_template,
    build_translation_messages,
    build_translation_prompt,
    language_name,
    postprocess_translation,
)
from moepost.errors import UserError


def test_apply_prompt_template() -> None:
    row = {"question": "2+2?", "answer": "4"}
    assert apply_prompt_template("Q: {question}\nA:", row) == "Q: 2+2?\nA:"
    assert apply_prompt_template('{{"q": "{question}"}}', row) == '{"q": "2+2?"}'
    with pytest.raises(UserError, match=r"field \{context\} is not a column.*answer, question"):
        apply_prompt_template("{context} {question}", row)
    with pytest.raises(UserError, match="positional field"):
        apply_prompt_template("{} {question}", row)
    with pytest.raises(UserError, match="literal braces"):
        apply_prompt_template("{question", row)


def test_translation_prompt_and_messages() -> None:
    prompt = build_translation_prompt("Good morning", "en", "ko")
    assert prompt.startswith("Translate the following English text into Korean.")
    assert "Output only the Korean translation" in prompt
    assert prompt.endswith("English text:\nGood morning")
    custom = build_translation_prompt(
        "Hallo", "de", "Japanese", template="{source_lang}>{target_lang}: {source_text}"
    )
    assert custom == "German>Japanese: Hallo"
    assert language_name("pt-BR") == "pt-BR"
    messages = build_translation_messages("Hi", "en", "fr", system_prompt="You translate.")
    assert messages == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": build_translation_prompt("Hi", "en", "fr")},
    ]
    assert [m["role"] for m in build_translation_messages("Hi", "en", "fr")] == ["user"]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<|im_start|>assistant\n안녕하세요<|im_end|>\n<|endoftext|>", "안녕하세요"),
        ("<think>\nthe user wants Korean\n</think>\n\nTranslation: Hello world", "Hello world"),
        ("reasoning opened by the chat template</think>번역: 안녕하세요", "안녕하세요"),
        ("<think>ran out of tokens while thinking", ""),
        ('"Hello, world!"', "Hello, world!"),
        ("“Hello”", "Hello"),
        ("「こんにちは」", "こんにちは"),
        ('He said "hi" and "bye"', 'He said "hi" and "bye"'),  # inner quotes: kept
        ("Bonjour le monde.\n\nNote: I kept the formal register.", "Bonjour le monde."),
        ("Un.\n\nDeux.\n\n(This is a literal translation.)", "Un.\n\nDeux."),
        ("**Translation:** Hola", "Hola"),
        ("Here is the translation:\nHola mundo", "Hola mundo"),
        ("Korean translation: 안녕", "안녕"),
        ("번역문: 안녕하세요\n\n참고: 존댓말을 사용했습니다.", "안녕하세요"),
        ("Note: only a note", "Note: only a note"),  # nothing would remain: kept
        ("<start_of_turn>model\nCiao<end_of_turn>", "Ciao"),
        ("  plain text  ", "plain text"),
    ],
)
def test_postprocess_translation(completion: str, expected: str) -> None:
    assert postprocess_translation(completion) == expected
