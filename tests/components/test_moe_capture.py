"""Router capture, routing replay and router freezing on tiny models of every supported family."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moepost.components.moe.capture import (
    ReplaySource,
    assemble_generation_routes,
    capture_routing,
    find_moe_layers,
    freeze_router,
    replay_routing,
    router_parameters,
)
from moepost.errors import UserError
from moepost.tools.tiny_model import ARCHS, build_tiny_model

ALL_ARCHS = (*ARCHS, "gpt_oss")
KIND = {
    "qwen3_moe": "softmax_topk",
    "qwen2_moe": "softmax_topk",
    "mixtral": "softmax_topk",
    "olmoe": "softmax_topk",
    "qwen3_5_moe": "softmax_topk",
    "deepseek_v3": "sigmoid_group_topk",
    "gpt_oss": "topk_softmax",
}
# norm_topk_prob as the tiny checkpoints have it (Qwen2-MoE and OLMoE default to False;
# Mixtral, Qwen3.5-MoE and GPT-OSS always renormalise).
NORM = {arch: arch not in ("qwen2_moe", "olmoe") for arch in ALL_ARCHS}
VOCAB = 104  # tiny_model's tokenizer size rounded up to 8
DS_BIAS = [0.05, -0.05, 0.1, 0.0]  # e_score_correction_bias, large next to sigmoid spreads here


@pytest.fixture(scope="module")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], nn.Module]:
    """Fresh tiny model (hidden 32, 2 MoE layers, 4 experts, top-2) per call, built once per arch."""
    from transformers import AutoModelForCausalLM

    paths: dict[str, Path] = {}

    def make(arch: str) -> nn.Module:
        torch.manual_seed(0)
        if arch == "gpt_oss":
            return AutoModelForCausalLM.from_config(_gpt_oss_config())
        if arch not in paths:
            # DeepSeek-V3: one of two groups may be picked and the scale is not 1, so the
            # group mask and routed_scaling_factor are exercised.
            extra = {"topk_group": 1, "routed_scaling_factor": 2.5} if arch == "deepseek_v3" else {}
            paths[arch] = build_tiny_model(
                tmp_path_factory.mktemp(arch), arch, hidden_size=32, **extra
            )
        model = AutoModelForCausalLM.from_pretrained(paths[arch])
        if arch == "deepseek_v3":
            for info in find_moe_layers(model):
                info.router.e_score_correction_bias.copy_(torch.tensor(DS_BIAS))
        return model

    return make


def _gpt_oss_config() -> object:
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )


def _tokens(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(10, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _router_inputs(model: nn.Module) -> tuple[list[torch.Tensor], list[object]]:
    """Pre-hooks that keep each router's input h (to recompute raw logits independently)."""
    seen: list[torch.Tensor] = []
    handles = [
        info.router.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        for info in find_moe_layers(model)
    ]
    return seen, handles


def _expert_calls(model: nn.Module) -> tuple[list[torch.Tensor], list[object]]:
    """Pre-hooks recording the top_k_index each experts module is actually called with."""
    seen: list[torch.Tensor] = []
    handles = []
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            handles.append(module.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone())))
    return seen, handles


def _reference_topk(arch: str, logits: torch.Tensor, router: nn.Module) -> torch.Tensor:
    """The routing rule of each family written out independently: chosen experts [N, K] sorted."""
    if arch == "deepseek_v3":
        scores = logits.sigmoid() + router.e_score_correction_bias
        groups = scores.view(-1, 2, 2)  # n_group=2 groups of 2 experts
        best = groups.sum(-1).argmax(-1)  # topk_group=1; a group's score is its top-2 sum
        chosen = torch.stack([best * 2, best * 2 + 1], dim=-1)
        return chosen.sort(-1).values
    return logits.topk(2, dim=-1).indices.sort(-1).values  # softmax is monotone


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_find_moe_layers(make_model, arch: str) -> None:
    model = make_model(arch)
    infos = find_moe_layers(model)
    assert [i.index for i in infos] == [0, 1] and [i.layer_idx for i in infos] == [0, 1]
    assert {i.kind for i in infos} == {KIND[arch]}
    assert all(i.num_experts == 4 and i.top_k == 2 for i in infos)
    assert [i.norm_topk_prob for i in infos] == [NORM[arch]] * 2
    assert all(i.weight is i.router.weight and i.weight.shape == (4, 32) for i in infos)
    assert (infos[0].bias is not None) == (arch == "gpt_oss")
    assert infos[0].routed_scaling_factor == (2.5 if arch == "deepseek_v3" else 1.0)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_capture_is_raw_and_leaves_outputs_unchanged(make_model, arch: str) -> None:
    model = make_model(arch)
    x = _tokens()
    reference = model(x).logits
    inputs, handles = _router_inputs(model)
    with capture_routing(model) as cap:
        captured = model(x).logits
    for h in handles:
        h.remove()
    assert torch.equal(reference, captured)
    assert cap.num_calls == 1 and cap.call_sizes() == [10]
    logits, indices = cap.logits(), cap.indices()
    assert logits.shape == (2, 10, 4) and indices.shape == (2, 10, 2)
    assert logits.requires_grad  # grad was enabled: an aux loss can reach the router
    for layer, info in enumerate(find_moe_layers(model)):
        raw = F.linear(inputs[layer].reshape(10, 32).float(), info.weight.float(), info.bias)
        torch.testing.assert_close(logits[layer].float(), raw, rtol=0, atol=1e-6)
        assert not torch.allclose(logits[layer].sum(-1), torch.ones(10), atol=1e-3)
        expected = _reference_topk(arch, logits[layer].detach(), info.router)
        assert torch.equal(indices[layer].sort(-1).values, expected)
    assert torch.equal(cap.own_indices(), indices)
    cap.clear()
    assert cap.num_calls == 0


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_capture_during_cached_generation(make_model, arch: str) -> None:
    model = make_model(arch).eval()
    prompt, steps = _tokens(2, 4), 3
    fed = [prompt]
    with torch.no_grad(), capture_routing(model, keep_logits=False) as cap:
        out = model(input_ids=prompt, use_cache=True)
        for _ in range(steps):
            fed.append(out.logits[:, -1].argmax(-1, keepdim=True))
            out = model(input_ids=fed[-1], past_key_values=out.past_key_values, use_cache=True)
    # 1 prefill record of B*P = 8 rows, then one record of B = 2 rows per decode step.
    assert all(len(records) == 1 + steps for records in cap.records)
    assert cap.call_sizes() == [8, 2, 2, 2]
    routes = assemble_generation_routes(cap, batch_size=2, total_len=4 + steps + 1)
    assert routes.shape == (2, 2, 8, 2)
    assert (routes[:, :, -1] == -1).all()  # the last generated token was never fed
    # The same tokens in one teacher-forced pass choose the same experts at every position.
    with torch.no_grad(), capture_routing(model) as full:
        model(torch.cat(fed, dim=1))
    full_routes = full.indices().reshape(2, 2, 7, 2).sort(-1).values
    assert torch.equal(routes[:, :, :7].sort(-1).values, full_routes)


def test_generate_routes_line_up_with_training_layout(make_model) -> None:
    model = make_model("qwen3_moe").eval()
    prompt = _tokens(2, 5)
    mask = torch.ones_like(prompt)
    prompt[1, :2], mask[1, :2] = 0, 0  # row 1 is left-padded by 2
    with torch.no_grad(), capture_routing(model, keep_logits=False) as cap:
        sequences = model.generate(
            prompt, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False
        )
    assert cap.call_sizes() == [10, 2, 2]
    routes = assemble_generation_routes(cap, batch_size=2, total_len=sequences.shape[1])
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), capture_routing(model) as train:
        model(sequences, attention_mask=full_mask, position_ids=positions)
    own = train.indices().reshape(2, 2, 8, 2).sort(-1).values
    real = full_mask.bool().clone()
    real[:, -1] = False  # never fed during generation
    assert torch.equal(routes.sort(-1).values[:, real], own[:, real])
    # Replaying those routes (with -1 = own choice) in the training pass changes no expert.
    with (
        torch.no_grad(),
        replay_routing(model, routes.reshape(2, 16, 2)),
        capture_routing(model) as rep,
    ):
        model(sequences, attention_mask=full_mask, position_ids=positions)
    assert torch.equal(rep.indices().reshape(2, 2, 8, 2).sort(-1).values[:, real], own[:, real])


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_replay_of_captured_routes_reproduces_the_forward(make_model, arch: str) -> None:
    model = make_model(arch).train()
    x = _tokens()
    with capture_routing(model) as first:
        out_a = model(x).logits
    with replay_routing(model, first.indices()), capture_routing(model) as second:
        out_b = model(x).logits
    assert torch.equal(out_a, out_b)
    assert torch.equal(first.logits(), second.logits())
    assert torch.equal(second.indices(), first.indices())
    # Rows of -1 keep the router's own choice: all -1 is plain routing.
    with replay_routing(model, torch.full((2, 10, 2), -1)):
        assert torch.equal(model(x).logits, out_a)


@pytest.mark.parametrize("arch", ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"))
def test_replay_is_bit_exact_in_bfloat16(make_model, arch: str) -> None:
    # Gate weights are cast back (Qwen), kept in float32 (Mixtral, DeepSeek-V3's float32 router)
    # or softmaxed in bfloat16 (GPT-OSS): replay must copy each choice to stay bit-exact.
    model = make_model(arch).to(torch.bfloat16).train()
    x = _tokens()
    with capture_routing(model) as first:
        out_a = model(x).logits
    with replay_routing(model, first.indices()):
        assert torch.equal(model(x).logits, out_a)
    assert first.logits().dtype == (torch.float32 if arch == "deepseek_v3" else torch.bfloat16)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_replay_forces_routes_and_router_still_learns(make_model, arch: str) -> None:
    model = make_model(arch).train()
    x = _tokens()
    with torch.no_grad(), capture_routing(model) as cap:
        model(x)
    routes = cap.indices()
    infos = find_moe_layers(model)
    with torch.no_grad():
        for info in infos:
            info.weight.neg_()  # the router now prefers other experts
    calls, handles = _expert_calls(model)
    with replay_routing(model, routes), capture_routing(model) as rep:
        loss = model(x).logits.pow(2).mean()
    for h in handles:
        h.remove()
    assert len(calls) == 2 and all(torch.equal(calls[i], routes[i]) for i in range(2))
    assert not torch.equal(rep.own_indices(), routes)  # without replay, routes would differ
    loss.backward()
    for info in infos:
        assert info.weight.grad is not None and info.weight.grad.abs().sum() > 0


def _replay_grads(
    model: nn.Module, x: torch.Tensor, source: ReplaySource, *, one_backward: bool = False
) -> list[torch.Tensor]:
    """Grads of sum over micro-batches x[i] of mean(logits^2) while replaying `source`.

    By default one forward + backward per micro-batch, as a trainer does; with `one_backward`
    all forwards first and a single backward, so recomputes meet several pending forwards.
    """
    model.zero_grad()
    source.rewind()
    with replay_routing(model, source):
        losses = []
        for micro_batch in x:
            losses.append(model(micro_batch).logits.pow(2).mean())
            if not one_backward:
                losses.pop().backward()
        if one_backward:
            sum(losses).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_replay_under_gradient_checkpointing(make_model, arch: str) -> None:
    model = make_model(arch).train()
    x = torch.stack([_tokens(seed=1), _tokens(seed=2)])  # 2 micro-batches [2, 5]
    with torch.no_grad(), capture_routing(model) as cap:
        for micro_batch in x:
            model(micro_batch)
    source = ReplaySource.from_capture(cap)
    assert [source.remaining(layer) for layer in range(2)] == [2, 2]
    with torch.no_grad():
        for info in find_moe_layers(model):
            info.weight.neg_()
    plain = _replay_grads(model, x, source)
    model.activation_checkpointing_enable()
    calls, handles = _expert_calls(model)
    with capture_routing(model) as during:
        checkpointed = _replay_grads(model, x, source)
    for h in handles:
        h.remove()
    # Each micro-batch: layer 0, layer 1 forward, then layer 1, layer 0 recomputed in backward.
    expected = [cap.records[layer][mb].indices for mb in range(2) for layer in (0, 1, 1, 0)]
    assert len(calls) == 8 and all(torch.equal(c, e) for c, e in zip(calls, expected))
    assert during.num_calls == 2  # the recomputes were not recorded again
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Two forwards then one backward: backward recomputes micro-batch 2 first (last in, first out).
    for a, b in zip(plain, _replay_grads(model, x, source, one_backward=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ("qwen3_moe", "deepseek_v3", "gpt_oss"))
def test_freeze_router_keeps_router_weights(make_model, arch: str) -> None:
    model = make_model(arch).train()
    frozen = freeze_router(model)
    assert frozen == (4 if arch == "gpt_oss" else 2)  # weight (+ bias) of 2 routers
    names = [name for name, _ in router_parameters(model)]
    assert all(
        name.endswith(("mlp.gate.weight", "mlp.router.weight", "mlp.router.bias")) for name in names
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(_tokens()).logits.pow(2).mean().backward()
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], before[name]) for name in names)
    moved = [
        name for name in before if name not in names and not torch.equal(after[name], before[name])
    ]
    assert any("lm_head" in name for name in moved) and any("experts" in name for name in moved)


@pytest.mark.parametrize("target_router", (True, False))
def test_capture_and_replay_under_peft_lora(make_model, target_router: bool) -> None:
    from peft import LoraConfig, get_peft_model

    base = make_model("qwen3_moe").train()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    if target_router:
        config.target_parameters = ["mlp.gate.weight"]
    model = get_peft_model(base, config)
    infos = find_moe_layers(model)
    assert [type(i.router).__name__ for i in infos] == ["Qwen3MoeTopKRouter"] * 2
    delta = torch.zeros(4, 32)
    if target_router:
        # lora_B starts at zero; make the adapter change the router so capture must see it.
        for name, param in model.named_parameters():
            if "mlp.gate.lora_B" in name:
                nn.init.normal_(param, std=0.5)
        wrapper = model.base_model.model.model.layers[0].mlp.gate
        delta = wrapper.get_delta_weight("default").detach()
        assert delta.abs().sum() > 0
    x = _tokens()
    reference = model(x).logits
    inputs, handles = _router_inputs(model)
    with capture_routing(model) as cap:
        assert torch.equal(model(x).logits, reference)
    for h in handles:
        h.remove()
    raw = F.linear(inputs[0].reshape(10, 32), infos[0].weight + delta)
    torch.testing.assert_close(cap.logits(0), raw, rtol=0, atol=1e-6)
    with replay_routing(model, cap.indices()):
        assert torch.equal(model(x).logits, reference)
    lora_names = [n for n, _ in router_parameters(model, include_adapters=True) if "lora_" in n]
    assert len(lora_names) == (4 if target_router else 0)  # lora_A, lora_B on 2 routers
    assert freeze_router(model) == 2 + len(lora_names)


def test_capture_inside_ddp(make_model, tmp_path: Path) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("another test left a process group initialised")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model("olmoe"))
        assert [i.name for i in find_moe_layers(model)] == [
            "model.layers.0.mlp.gate",
            "model.layers.1.mlp.gate",
        ]
        with capture_routing(model) as cap:
            model(_tokens())
        assert cap.indices().shape == (2, 10, 2)
        assert freeze_router(model) == 2
    finally:
        dist.destroy_process_group()


def test_dense_model_is_a_no_op() -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert find_moe_layers(model) == [] and router_parameters(model) == []
    assert freeze_router(model) == 0
    x = _tokens()
    reference = model(x).logits
    with capture_routing(model) as cap, replay_routing(model, []):
        assert torch.equal(model(x).logits, reference)
    assert cap.records == [] and cap.logits().shape == (0, 0, 0)


def test_unrecognised_router_without_top_k_is_a_user_error() -> None:
    # Found by shape (tests/components/test_custom_router.py), but nothing says its K.
    class CustomSparseBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(8, 4, bias=False)
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    model = nn.Sequential(nn.Linear(8, 8), CustomSparseBlock())
    with pytest.raises(
        UserError, match=r"MoE block '1' \(CustomSparseBlock\): cannot find its top-k"
    ):
        find_moe_layers(model)


def test_replay_rejects_routes_for_other_tokens(make_model) -> None:
    model = make_model("mixtral")
    with pytest.raises(
        RuntimeError, match=r"have shape \(6, 2\) but the router produced \(10, 2\)"
    ):
        with replay_routing(model, torch.zeros(2, 6, 2, dtype=torch.long)):
            model(_tokens())
    source = ReplaySource([[torch.zeros(10, 2, dtype=torch.long)]] * 2)
    with pytest.raises(RuntimeError, match="ran forward call 2 but only 1 sets"):
        with replay_routing(model, source):
            model(_tokens())
            model(_tokens())
