"""How RL rows are laid out for the training forward.

Row = [left pad | prompt | completion | right pad]. Prompts are left-padded to a common length P
and completions right-padded to a common length T, so every completion starts at column P,
S = P + T. Logits for completion positions P..P+T-1 come from positions P-1..P+T-2, i.e.
`model(..., logits_to_keep=T + 1).logits[:, :-1]`. Position ids count real tokens only, as in
generation, so left padding does not shift RoPE.
"""

from __future__ import annotations

from typing import Any

import torch


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] counting only real tokens, so left padding does not shift RoPE."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def build_training_tensors(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_token_id: int,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Lay out N (prompt, completion) rows for the training forward (layout above).

    Returns input_ids [N, S], attention_mask [N, S], position_ids [N, S] (real tokens only, so
    they match generation), completion_ids [N, T] (pad past each row's end), completion_mask
    [N, T] float32, num_completion_positions T and prompt_length P, S = P + T.
    Completion log-probs: logits = model(input_ids, attention_mask, position_ids,
    logits_to_keep=T + 1).logits[:, :-1] -> [N, T, V], gathered at completion_ids.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    n = len(prompt_ids)
    p_len = max(len(p) for p in prompt_ids)
    t_len = max((len(c) for c in completion_ids), default=0)
    input_ids = torch.full((n, p_len + t_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, p_len + t_len), dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        row = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        start = p_len - len(prompt)
        input_ids[i, start : start + row.numel()] = row
        attention_mask[i, start : start + row.numel()] = 1
    completion_mask = attention_mask[:, p_len:].float()
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": real_positions(attention_mask).to(device),
        "completion_ids": input_ids[:, p_len:].clone().to(device),
        "completion_mask": completion_mask.to(device),
        "num_completion_positions": t_len,
        "prompt_length": p_len,
    }
