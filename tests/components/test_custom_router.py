"""Routers moepost has not verified: discovery by shape, `moe.router_module`, capture and replay
through the block's own top-k, on a tiny `trust_remote_code` MoE (custom_moe_modeling.py)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import custom_moe_modeling as cm
import pytest
import torch
import yaml
from torch import nn

from moepost.components.model.loading import load_policy
from moepost.components.moe.capture import (
    capture_routing,
    find_moe_layers,
    freeze_router,
    replay_routing,
    router_parameters,
)
from moepost.components.moe.discovery import set_router_module
from moepost.components.moe.router_setup import (
    aux_loss,
    capture_router,
    describe_router,
    router_setup,
)
from moepost.config.load import load_config
from moepost.config.schema import MiscConfig, ModelConfig, MoEConfig
from moepost.errors import UserError
from moepost.recipes.rl import run_rl
from moepost.recipes.sft import run_sft
from moepost.tools.doctor import prepare, run_doctor
from moepost.tools.doctor_router import custom_router_checks
from moepost.tools.tiny_model import build_tokenizer


def build_custom_moe(out: Path, seed: int = 0, **config: object) -> Path:
    """Save the custom MoE with `save_pretrained` (modeling file + auto_map) and a tokenizer."""
    tokenizer = build_tokenizer()
    vocab = (len(tokenizer) + 7) // 8 * 8
    cm.CustomMoeConfig.register_for_auto_class()
    cm.CustomMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    torch.manual_seed(seed)
    model = cm.CustomMoeForCausalLM(cm.CustomMoeConfig(vocab_size=vocab, **config))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_custom_moe(tmp_path_factory.mktemp("custom") / "linear")


def load(path: Path) -> nn.Module:
    model = load_policy(
        ModelConfig(policy_name_or_path=str(path), trust_remote_code=True),
        MiscConfig(device="cpu"),
        device=torch.device("cpu"),
    )
    return model


def _tokens() -> torch.Tensor:
    return torch.tensor([[5, 17, 30, 42, 8], [9, 60, 3, 11, 27]])


def test_saved_with_auto_map_and_loaded_as_remote_code(custom_dir: Path) -> None:
    import json

    config = json.loads((custom_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "custom_moe_modeling.CustomMoeForCausalLM"
    assert (custom_dir / "custom_moe_modeling.py").is_file()
    model = load(custom_dir)
    # the class comes from the copied file (transformers' dynamic module), not from this folder
    assert type(model).__module__.startswith("transformers_modules")
    assert type(model.layers[0].mlp.gate) is nn.Linear


def test_discovery_finds_the_linear_gate_and_warns(
    custom_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load(custom_dir)
    with caplog.at_level(logging.WARNING, logger="moepost.moe"):
        tools = router_setup(model, MoEConfig())
        find_moe_layers(model)  # warned once per model, not per call
    layers = tools.layers
    assert [i.name for i in layers] == ["layers.0.mlp.gate", "layers.1.mlp.gate"]
    assert [(i.kind, i.num_experts, i.top_k) for i in layers] == [("block_topk", 4, 2)] * 2
    assert layers[0].weight is model.layers[0].mlp.gate.weight
    assert layers[0].block is model.layers[0].mlp
    warns = [r.getMessage() for r in caplog.records if r.name == "moepost.moe"]
    assert len(warns) == 1
    assert warns[0].startswith(
        "WARN router Linear is not in moepost's verified list; found by shape"
    )
    assert "took 'layers.0.mlp.gate' (weight [4, 32] = [E, H], top-2 of 4 experts" in warns[0]
    assert "run `moepost doctor`" in warns[0] and "moe.router_module" in warns[0]
    assert "block_topk at layers.0.mlp.gate, not verified: run moepost doctor" in describe_router(
        tools
    )
    assert tools.aux_coef == pytest.approx(0.01)  # the checkpoint's router_aux_loss_coef


def _block_choices(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per block: top-k of softmax(gate(h)) recomputed from the block's input, and the logits."""
    inputs: list[torch.Tensor] = []
    handles = [
        layer.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
        for layer in model.layers
    ]
    try:
        out = model(x).logits
    finally:
        for h in handles:
            h.remove()
    chosen = []
    for layer, h in zip(model.layers, inputs, strict=True):
        logits = layer.mlp.gate(h.reshape(-1, h.shape[-1]))
        chosen.append(torch.topk(torch.softmax(logits.float(), -1), 2, dim=-1).indices)
    return chosen, out


def test_capture_gives_raw_logits_and_the_blocks_choice(custom_dir: Path) -> None:
    model = load(custom_dir)
    x = _tokens()
    expected, reference = _block_choices(model, x)
    with capture_routing(model) as cap:
        out = model(x).logits
    assert torch.equal(out, reference)  # capture changes nothing
    assert cap.logits().shape == (2, 10, 4) and cap.indices().shape == (2, 10, 2)
    for layer in range(2):
        assert torch.equal(cap.indices(layer), expected[layer])
        assert torch.equal(cap.own_indices(layer), expected[layer])
    assert not torch.allclose(cap.logits().sum(-1), torch.ones(2, 10), atol=1e-3)


def test_replay_own_routes_is_identity_and_other_routes_change_the_output(
    custom_dir: Path,
) -> None:
    model = load(custom_dir)
    x = _tokens()
    with capture_routing(model) as cap:
        reference = model(x).logits
    own = cap.indices()
    with replay_routing(model, own), capture_routing(model) as again:
        assert torch.equal(model(x).logits, reference)
    assert torch.equal(again.indices(), own)
    other = (own + 1) % 4  # still two distinct experts per token
    with replay_routing(model, other), capture_routing(model) as moved:
        changed = model(x).logits
    assert not torch.allclose(changed, reference)
    assert torch.equal(moved.indices(), other)
    # layer 0 sees the same inputs, so its own choice is unchanged (layer 1's inputs moved)
    assert torch.equal(moved.own_indices(0), own[0])
    # gate weights under replay are the block's own: softmax at the replayed experts, renormalised
    block, h = model.layers[0].mlp, torch.randn(3, 32)
    logits = block.gate(h)
    routes = torch.tensor([[3, 0], [1, 2], [0, 3]])
    probs = torch.softmax(logits, -1).gather(1, routes)
    probs = probs / probs.sum(-1, keepdim=True)
    manual = sum(
        probs[:, j, None]
        * torch.stack([block.experts[int(e)](h[r]) for r, e in enumerate(routes[:, j])])
        for j in range(2)
    )
    layers = find_moe_layers(model)
    with replay_routing(model, [routes, routes]):
        assert layers[0].block is block
        torch.testing.assert_close(block(h), manual)


def test_aux_loss_gradient_reaches_the_gate_and_freezing(custom_dir: Path) -> None:
    model = load(custom_dir)
    tools = router_setup(model, MoEConfig(router_aux_loss_coef=0.1))
    with capture_router(tools) as cap:
        model(_tokens())
    aux, metrics = aux_loss(tools, cap, torch.ones(10, dtype=torch.bool), share=1.0)
    assert metrics["aux_loss"] >= 2.0 - 1e-6
    aux.backward()
    for layer in model.layers:
        assert float(layer.mlp.gate.weight.grad.norm()) > 0
    # nothing after the last router feeds the aux loss
    assert (
        model.layers[-1].mlp.experts[0].up.weight.grad is None and model.lm_head.weight.grad is None
    )
    names = [n for n, _ in router_parameters(model)]
    assert names == ["layers.0.mlp.gate.weight", "layers.1.mlp.gate.weight"]
    assert freeze_router(model) == 2 and not model.layers[1].mlp.gate.weight.requires_grad


def test_ambiguous_block_needs_router_module(tmp_path: Path) -> None:
    model = load(build_custom_moe(tmp_path / "two_gates", extra_gate=True))
    with pytest.raises(UserError) as err:
        find_moe_layers(model)
    message = str(err.value)
    assert message.startswith("model: MoE block 'layers.0.mlp' (CustomMoeSparseBlock) has a ")
    assert "several candidates gate, noise_gate [E=4, H=32]" in message
    assert "set moe.router_module" in message
    tools = router_setup(model, MoEConfig(router_module="mlp.gate"))
    assert [i.name for i in tools.layers] == ["layers.0.mlp.gate", "layers.1.mlp.gate"]
    with capture_router(tools) as cap:
        model(_tokens())
    assert cap.indices().shape == (2, 10, 2)


def test_router_module_by_class_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = load(build_custom_moe(tmp_path / "module", router_style="module"))
    with caplog.at_level(logging.WARNING, logger="moepost.moe"):
        tools = router_setup(model, MoEConfig(router_module="CustomMoeRouter"))
    assert [i.name for i in tools.layers] == ["layers.0.mlp.gate", "layers.1.mlp.gate"]
    (warn,) = [r.getMessage() for r in caplog.records if r.name == "moepost.moe"]
    assert "moe.router_module = 'CustomMoeRouter': took 'layers.0.mlp.gate'" in warn
    x = _tokens()
    with capture_routing(model) as cap:
        reference = model(x).logits
    with replay_routing(model, cap.indices()):
        assert torch.equal(model(x).logits, reference)
    # The same router is also found by shape (a module with a 2-D [E, H] weight).
    set_router_module(model, None)
    assert [i.kind for i in find_moe_layers(model)] == ["block_topk"] * 2


def test_router_with_top_k_inside_and_no_logits_output(tmp_path: Path) -> None:
    """DeepSeek-style hub router (the G3MoE seed's kind): returns (indices, weights) only."""
    model = load(build_custom_moe(tmp_path / "topk_router", router_style="topk_router"))
    layers = router_setup(model, MoEConfig()).layers
    assert [i.name for i in layers] == ["layers.0.mlp.router", "layers.1.mlp.router"]
    router = model.layers[0].mlp.router
    assert layers[0].weight is router.router.weight and layers[0].top_k == 2
    inputs: list[torch.Tensor] = []
    handle = router.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    x = _tokens()
    with capture_routing(model) as cap:
        reference = model(x).logits
    handle.remove()
    h = inputs[0].reshape(-1, 32)
    # logits recomputed as x W^T from the router's input, with their gradient to W
    torch.testing.assert_close(cap.logits(0), h @ router.router.weight.T, rtol=0, atol=0)
    assert cap.logits(0).requires_grad
    chosen = torch.topk(torch.sigmoid(h @ router.router.weight.T), 2, dim=-1, sorted=False)[1]
    assert torch.equal(cap.indices(0), chosen)
    with replay_routing(model, cap.indices()):
        assert torch.equal(model(x).logits, reference)
    with replay_routing(model, (cap.indices() + 1) % 4):
        assert not torch.allclose(model(x).logits, reference)
    assert [n for n, _ in router_parameters(model)] == [
        "layers.0.mlp.router.router.weight", "layers.1.mlp.router.router.weight"
    ]  # fmt: skip


def test_doctor_warns_when_the_block_routes_on_other_scores(tmp_path: Path) -> None:
    """A correction bias moves the choice away from the top-k of the logits: WARN, not FAIL."""
    model_dir = build_custom_moe(tmp_path / "biased", router_style="topk_router")
    setup = prepare(str(_config_file(tmp_path, model_dir, "rl")), [])
    for layer in setup.model.layers:
        layer.mlp.router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    checks = {c.name: c for c in custom_router_checks(setup)}
    assert checks["router capture"].status == "WARN"
    assert (
        "the block routes on other scores than the captured logits"
        in checks["router capture"].detail
    )
    assert checks["router replay"].status == "OK"


def test_router_module_that_names_nothing(custom_dir: Path) -> None:
    model = load(custom_dir)
    with pytest.raises(UserError, match=r"^moe.router_module: 'mlp.router' names no module"):
        router_setup(model, MoEConfig(router_module="mlp.router"))


def test_router_module_without_logits_fails_at_the_forward(custom_dir: Path) -> None:
    model = load(custom_dir)
    with pytest.raises(UserError, match=r"'layers.0.attn.qkv' \(Linear\) has no 2-D weight \[E=4"):
        router_setup(model, MoEConfig(router_module="attn.qkv"))  # [3H, H], not [E, H]


def test_block_without_a_topk_fails_at_the_forward(
    custom_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load(custom_dir)

    def argsort_routing(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        logits = self.gate(hidden.reshape(-1, hidden.shape[-1]))
        chosen = torch.argsort(logits, dim=-1, descending=True)[:, : self.top_k]
        return hidden * (1 + chosen.float().mean())

    monkeypatch.setattr(type(model.layers[0].mlp), "forward", argsort_routing)
    with pytest.raises(
        RuntimeError,
        match=r"^MoE layer 0 \(layers.0.mlp.gate\): no torch.topk "
        r"with k=2 over the 4 experts ran in the block, .*set moe.router_module",
    ):
        with capture_routing(model):
            model(_tokens())


def test_uncapturable_router_is_a_one_line_error_naming_the_key(tmp_path: Path) -> None:
    model = load(build_custom_moe(tmp_path / "matmul", router_style="matmul"))
    with pytest.raises(UserError) as err:
        router_setup(model, MoEConfig())
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        "model: MoE block 'layers.0.mlp' (CustomMoeSparseBlock) has a router moepost cannot "
        "capture (no child with a 2-D weight [E=4, H=32] next to its experts); set "
        "moe.router_module to the module that computes the router logits (a class name such as "
        "'G3MoeTopkRouter' or an attribute path such as 'mlp.gate')"
    )


# ---- doctor, command line, training runs ---------------------------------------------------

PROBLEMS = [(a, b) for a, b in [(1, 2), (13, 4), (5, 16), (7, 1), (3, 3), (8, 9), (2, 6), (4, 11)]]


def _data(root: Path) -> Path:
    rows = [{"question": f"What is {a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in PROBLEMS]  # fmt: skip
    path = root / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config_file(root: Path, model: Path, stage: str, **sections: dict) -> Path:
    cfg: dict = {
        "stage": stage,
        "model": {"policy_name_or_path": str(model), "trust_remote_code": True},
        "data": {"train_file": str(_data(root)), "max_seq_length": 64},
        "optim": {"learning_rate": 3e-3},
        "logging": {"output_dir": str(root / f"run_{stage}"), "write_report": False},
        "misc": {"device": "cpu"},
    }
    if stage == "sft":
        cfg["train"] = {"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "seed": 1}
    else:
        cfg["generation"] = {"num_samples_per_prompt": 2, "max_new_tokens": 6, "temperature": 1.0}
        cfg["rl"] = {"algorithm": "gspo"}
        cfg["reward"] = {"functions": [{"name": "gsm8k"}]}
        cfg["train"] = {"max_steps": 2, "prompts_per_step": 2, "micro_batch_size": 2, "seed": 3}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = root / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_doctor_verifies_the_discovered_router(
    custom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _config_file(tmp_path, custom_dir, "rl", moe={"routing_replay": "r3"})
    assert run_doctor(str(path), []) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in out.splitlines()[1:-1]}
    assert list(lines) == [
        "MoE layers", "router logits", "aux loss gradient", "aux coefficient",
        "expert load (prompts)", "router capture", "router replay",
        "train vs rollout logprob", "train vs rollout routing", "memory",
    ]  # fmt: skip
    assert all(" OK " in line for line in lines.values()), out
    assert out.splitlines()[-1] == "10 checks: 10 OK, 0 WARN, 0 FAIL"
    assert "Linear (block_topk), not verified, taken at layers.0.mlp.gate by shape" in out
    assert "at 100.0% of" in lines["router capture"]
    assert "own routes replayed: output bit-identical" in lines["router replay"]
    assert "reaches the router" in lines["aux loss gradient"]
    assert "flip rate 0 " in lines["train vs rollout routing"]


def test_doctor_fails_when_replay_misses_the_routing_top_k(
    custom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block whose first top-k over the experts is not the one it routes with."""
    path = _config_file(tmp_path, custom_dir, "rl")
    setup = prepare(str(path), [])
    block_cls = type(setup.model.layers[0].mlp)
    original = block_cls.forward

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        logits = self.gate(hidden.reshape(-1, hidden.shape[-1]))
        self.last_top = torch.topk(logits.detach(), self.top_k, dim=-1).indices  # "logging"
        return original(self, hidden)

    monkeypatch.setattr(block_cls, "forward", forward)
    checks = {c.name: c for c in custom_router_checks(setup)}
    assert checks["router capture"].status == "OK"
    assert checks["router replay"].status == "FAIL"
    assert "replaying other experts did not change the output" in checks["router replay"].detail


def test_cli_uncapturable_router_exits_two(tmp_path: Path) -> None:
    model = build_custom_moe(tmp_path / "matmul", router_style="matmul")
    path = _config_file(tmp_path, model, "sft")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "moepost", "train", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "moe.router_module" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert (
        "MoE block 'layers.0.mlp' (CustomMoeSparseBlock) has a router moepost cannot" in errors[0]
    )


def test_sft_trains_the_custom_router_with_aux_loss(custom_dir: Path, tmp_path: Path) -> None:
    path = _config_file(tmp_path, custom_dir, "sft", moe={"router_aux_loss_coef": 0.1})
    run_sft(load_config(str(path), []))
    out = tmp_path / "run_sft"
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    for row in steps:
        assert row["aux_loss"] >= 2.0 - 1e-6 and 0 < row["moe/load_entropy"] <= 1
    loads = [json.loads(line) for line in (out / "expert_load.jsonl").read_text().splitlines()]
    assert len(loads) == 3 and len(loads[0]["load_fraction"]) == 2
    assert all(abs(sum(f) - 1) < 1e-5 for f in loads[0]["load_fraction"])
    before = load(custom_dir).layers[0].mlp.gate.weight
    after = load(out / "final").layers[0].mlp.gate.weight
    assert not torch.allclose(before, after)  # the router was trained


def test_rl_with_r3_replays_the_rollout_routes(custom_dir: Path, tmp_path: Path) -> None:
    moe = {"routing_replay": "r3", "router_aux_loss_coef": 0.1}
    run_rl(load_config(str(_config_file(tmp_path, custom_dir, "rl", moe=moe)), []))
    rows = [json.loads(line) for line in (tmp_path / "run_rl" / "train_log.jsonl").read_text().splitlines()]  # fmt: skip
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert math.isfinite(row["loss"]) and row["aux_loss"] >= 2.0 - 1e-6
        # the training pass used exactly the experts that generated the tokens
        assert row["moe/route_flip_rate_rollout_train"] == 0.0
        assert 0 < row["moe/load_entropy"] <= 1


def test_lora_on_the_custom_gate_is_captured_and_frozen_with_it(custom_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(custom_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["gate"]))
    layers = find_moe_layers(model)
    gate = model.base_model.model.layers[0].mlp.gate
    assert layers[0].router is gate and layers[0].weight is gate.base_layer.weight
    with torch.no_grad():  # a non-zero adapter, so its delta shows in the logits
        for info in layers:
            info.router.lora_B["default"].weight.fill_(0.5)
    x = _tokens()
    outputs: list[torch.Tensor] = []
    handle = gate.register_forward_hook(lambda m, a, out: outputs.append(out))
    tools = router_setup(model, MoEConfig(router_aux_loss_coef=0.1))
    with capture_router(tools) as cap:
        model(input_ids=x)
    handle.remove()
    torch.testing.assert_close(cap.logits(0), outputs[0], rtol=0, atol=0)  # with the adapter
    aux, _ = aux_loss(tools, cap, torch.ones(10, dtype=torch.bool), share=1.0)
    aux.backward()
    assert float(gate.lora_A["default"].weight.grad.norm()) > 0
    names = [n for n, _ in router_parameters(model, include_adapters=True)]
    assert "base_model.model.layers.0.mlp.gate.lora_A.default.weight" in names
    assert freeze_router(model) == 6  # per layer: the gate weight and both adapter matrices


@pytest.mark.parametrize("spec", ["", " mlp.gate", ".gate"])
def test_router_module_value_is_checked_before_loading(
    custom_dir: Path, tmp_path: Path, spec: str
) -> None:
    path = _config_file(tmp_path, custom_dir, "sft", moe={"router_module": spec})
    with pytest.raises(UserError, match=r"^moe.router_module = .*: expected a router class name"):
        load_config(str(path), [])
