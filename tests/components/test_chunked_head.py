"""The chunked LM head inside a real tiny MoE: the SFT loss and every parameter's gradient
equal the full-logits path (float32, rel 1e-5), also with tied embeddings and LoRA; archs that
change logits after the head, hooked heads and adapted heads take the full path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from moepost.components.model.lm_head import (
    HeadRequest,
    chunked_head_off,
    describe_head,
    head_chunk_rows,
    head_output,
    head_passthrough,
    head_request,
)
from moepost.errors import UserError
from moepost.recipes import sft as sft_recipe
from moepost.tools.tiny_model import build_tiny_model


def _model(tmp_path: Path, **overrides: Any) -> torch.nn.Module:
    path = build_tiny_model(tmp_path / "m", "qwen3_moe", seed=0, num_layers=1, **overrides)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 100, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model: torch.nn.Module, chunk_rows: int) -> tuple[float, dict, dict]:
    model.zero_grad(set_to_none=True)
    loss, m = sft_recipe.forward_loss(model, _batch(), 18, chunk_rows=chunk_rows)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), {k: float(v) for k, v in m.items()}, grads


def _assert_same(model: torch.nn.Module) -> None:
    full_loss, full_m, full_g = _loss_and_grads(model, 0)
    for rows in (1, 5, 4096):
        loss, m, grads = _loss_and_grads(model, rows)
        assert loss == pytest.approx(full_loss, rel=1e-5)
        assert m["num_tokens"] == full_m["num_tokens"] == 18
        assert m["token_accuracy"] == full_m["token_accuracy"]
        assert m["loss_sum"] == pytest.approx(full_m["loss_sum"], rel=1e-5)
        assert grads.keys() == full_g.keys() and len(grads) >= 4
        for name, g in grads.items():
            torch.testing.assert_close(g, full_g[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sft_loss_and_all_gradients_match_full_logits(tmp_path: Path) -> None:
    model = _model(tmp_path)
    assert chunked_head_off(model) is None
    assert head_chunk_rows(model, 64) == 64 and head_chunk_rows(model, 0) == 0
    assert "chunked, 64 tokens" in describe_head(model, 64)
    _assert_same(model)


def test_tied_embeddings(tmp_path: Path) -> None:
    model = _model(tmp_path, tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_same(model)


def test_lora_model_finds_the_head_through_peft(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model(tmp_path), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    )
    with torch.no_grad():  # non-zero adapters, so the adapter gradients are not all trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert chunked_head_off(model) is None
    _assert_same(model)


def test_adapted_head_hooks_and_post_head_transforms_use_full_logits(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(_model(tmp_path), LoraConfig(r=2, target_modules=["lm_head"]))
    assert "not nn.Linear" in (chunked_head_off(adapted) or "")
    assert head_chunk_rows(adapted, 64) == 0
    hooked = _model(tmp_path)
    hooked.lm_head.register_forward_hook(lambda _m, _i, out: out)
    assert "forward hooks" in (chunked_head_off(hooked) or "")
    scaled = _model(tmp_path)
    scaled.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping=30.0" in (chunked_head_off(scaled) or "")
    assert "full logits, not chunked" in describe_head(scaled, 64)


def test_a_model_that_changes_the_head_output_is_an_error(tmp_path: Path) -> None:
    model = _model(tmp_path)
    original = model.forward

    def scaled(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        out.logits = out.logits / 2.0  # what Granite does with `logits_scaling`
        return out

    model.forward = scaled  # type: ignore[method-assign]
    ids = torch.tensor([[5, 6, 7]])
    request = HeadRequest(labels=torch.tensor([[6, 7, -1]]))
    with head_request(model, request):
        out = model(input_ids=ids)
    with pytest.raises(UserError, match="train.lm_head_chunk_rows: 0"):
        head_output(out, request)


def test_head_dense_and_passthrough(tmp_path: Path) -> None:
    model = _model(tmp_path)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        full = model(input_ids=ids, logits_to_keep=2).logits.log_softmax(-1)  # [2, 2, V]
        request = HeadRequest(labels=torch.tensor([[9, -1], [-1, 11]]))
        with head_request(model, request):
            out = model(input_ids=ids, logits_to_keep=2)
        dense = request.dense(head_output(out, request))
        with head_passthrough(model) as head:
            hidden = model(input_ids=ids).logits
    assert dense.shape == (2, 2) and float(dense[0, 1]) == 0.0 == float(dense[1, 0])
    torch.testing.assert_close(dense[[0, 1], [0, 1]], torch.stack([full[0, 0, 9], full[1, 1, 11]]))
    assert head is model.lm_head and hidden.shape == (2, 3, 64)
    assert "forward" not in vars(model.lm_head)  # the head's own forward is back
    torch.testing.assert_close(model.lm_head(hidden), model(input_ids=ids).logits)
