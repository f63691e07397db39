"""Cross-field checks and RL preset resolution, run before any model is loaded."""

from __future__ import annotations

import os

from moepost.config.schema import Config
from moepost.errors import UserError
from moepost.micro_batches import splits_evenly

# `rl.<key>` <- `AlgorithmPreset.<field>`: the preset fields a config may leave unset.
_PRESET_FIELDS = {
    "ratio_level": "ratio_level",
    "clip_eps_low": "clip_eps_low",
    "clip_eps_high": "clip_eps_high",
    "loss_aggregation": "aggregation",
    "kl_coef": "kl_coef",
    "dynamic_sampling": "dynamic_sampling",
    "overlong_shaping": "overlong_shaping",
}


def resolve_rl_presets(cfg: Config) -> None:
    """Fill every `None` RL field from the algorithm's preset (in place); user values win.

    The one place a preset is read: from here on the run reads `cfg.rl` only.
    """
    from moepost.algorithms.policy_loss import ALGORITHM_PRESETS

    preset = ALGORITHM_PRESETS[cfg.rl.algorithm]
    for ours, theirs in _PRESET_FIELDS.items():
        if getattr(cfg.rl, ours) is None:
            setattr(cfg.rl, ours, getattr(preset, theirs))
    if cfg.rl.advantage_std_normalize is None:
        cfg.rl.advantage_std_normalize = preset.advantage_mode == "std"


def check_all(cfg: Config) -> None:
    from moepost.config.ranges import check_ranges

    check_ranges(cfg)
    _check_model_data(cfg)
    _check_train(cfg)
    if cfg.stage == "rl":
        resolve_rl_presets(cfg)
        _check_rl(cfg)
    _check_misc(cfg)
    _check_router_module(cfg)
    _check_data_parallel(cfg, int(os.environ.get("WORLD_SIZE", "1")))


def _check_model_data(cfg: Config) -> None:
    if not cfg.model.policy_name_or_path:
        raise UserError("model.policy_name_or_path is required (a local folder or a hub name)")
    d = cfg.data
    if not (d.train_file or d.dataset_name or d.eval_file):
        raise UserError("data.train_file (or data.dataset_name) is required")
    if d.test_size < 0 or (d.test_size >= 1 and d.test_size != int(d.test_size)):
        raise UserError(f"data.test_size = {d.test_size}: expected a fraction in [0, 1) or a count")
    _check_streaming(cfg)
    lora = cfg.model.lora
    if lora.enabled and lora.dropout > 0 and (lora.target_experts or lora.target_router):
        raise UserError(
            f"model.lora.dropout = {lora.dropout}: peft applies no dropout to adapters on "
            "expert / router parameters (target_experts / target_router); set it to 0"
        )


def _check_streaming(cfg: Config) -> None:
    d = cfg.data
    if not d.streaming:
        return
    if cfg.train.max_steps <= 0:
        raise UserError(
            "train.max_steps: required with data.streaming: true (a stream's length is unknown, "
            "so train.num_epochs cannot give the number of steps; passes repeat as needed)"
        )
    if d.test_size:
        raise UserError(
            f"data.test_size = {d.test_size}: cannot hold rows out of a stream; set "
            "data.eval_file (or data.eval_split) with data.streaming: true"
        )
    if d.packing and cfg.stage == "sft":
        raise UserError(
            "data.packing: SFT packing of a stream is not supported yet (it packs the whole "
            "dataset); set data.packing: false or data.streaming: false"
        )


def _check_train(cfg: Config) -> None:
    t = cfg.train
    # Signs and ranges of single keys: config/ranges.py (checked first).
    if t.micro_batch_tokens and t.gradient_accumulation_steps is not None:
        raise UserError(
            "train.gradient_accumulation_steps and train.micro_batch_tokens both set the "
            "micro-batches; with a token budget their number follows the lengths, so drop one"
        )
    if cfg.stage == "sft" and not t.micro_batch_tokens:
        accum = t.gradient_accumulation_steps
        if accum is not None and t.micro_batch_size * accum != t.batch_size:
            raise UserError(
                f"train.batch_size ({t.batch_size}) must equal train.micro_batch_size "
                f"({t.micro_batch_size}) x train.gradient_accumulation_steps ({accum})"
            )
        if not splits_evenly(t.batch_size, t.micro_batch_size):
            raise UserError(
                f"train.batch_size ({t.batch_size}) must be divisible by "
                f"train.micro_batch_size ({t.micro_batch_size})"
            )
    if len(cfg.optim.betas) != 2:
        raise UserError("optim.betas: expected two numbers, e.g. [0.9, 0.999]")
    ni = cfg.noise_injection
    if ni.enabled and ni.num_stages < 3:
        raise UserError(f"noise_injection.num_stages = {ni.num_stages}: must be >= 3")
    if cfg.optim.stochastic_rounding and cfg.optim.master_weights == "fp32":
        raise UserError(
            "optim.stochastic_rounding and optim.master_weights=fp32 are alternatives; pick one"
        )


def _check_rl(cfg: Config) -> None:
    g = cfg.generation.num_samples_per_prompt
    if g < 2:
        raise UserError(
            f"generation.num_samples_per_prompt = {g}: rl.algorithm={cfg.rl.algorithm} compares "
            "each completion with the others of its group (group baseline), so it needs at "
            "least 2 samples per prompt"
        )
    rows = cfg.train.prompts_per_step * g
    if not cfg.train.micro_batch_tokens and not splits_evenly(rows, cfg.train.micro_batch_size):
        raise UserError(
            f"train.prompts_per_step ({cfg.train.prompts_per_step}) x "
            f"generation.num_samples_per_prompt ({g}) = {rows} must be divisible by "
            f"train.micro_batch_size ({cfg.train.micro_batch_size})"
        )
    if cfg.moe.routing_replay == "r3" and cfg.generation.backend == "vllm":
        raise UserError(
            "moe.routing_replay=r3 needs the routes chosen during generation, which "
            "generation.backend=vllm does not return; use backend hf or routing_replay r2"
        )
    if cfg.generation.temperature <= 0:
        raise UserError(
            "generation.temperature must be > 0 for RL sampling "
            "(greedy rollouts give a group no variance)"
        )
    if cfg.rl.overlong_shaping and cfg.rl.overlong_cache_length >= cfg.generation.max_new_tokens:
        raise UserError(
            f"rl.overlong_cache_length ({cfg.rl.overlong_cache_length}) must be smaller than "
            f"generation.max_new_tokens ({cfg.generation.max_new_tokens})"
        )
    if not cfg.reward.functions and not cfg.reward.metricx and not cfg.reward.xcomet:
        raise UserError("reward.functions is empty: name at least one, e.g. [{name: gsm8k}]")


def _check_misc(cfg: Config) -> None:
    dist = cfg.distributed
    if dist.offload_param and not (dist.backend == "deepspeed" and dist.zero_stage == 3):
        raise UserError(
            "distributed.offload_param needs distributed.backend=deepspeed with "
            f"distributed.zero_stage=3 (got backend={dist.backend}, zero_stage={dist.zero_stage})"
        )
    if dist.offload_optimizer and dist.backend != "deepspeed":
        # Only DeepSpeed offloads; accepting it elsewhere would silently keep the states on GPU.
        raise UserError(
            "distributed.offload_optimizer needs distributed.backend=deepspeed "
            f"(got backend={dist.backend}); ddp and fsdp keep the optimizer states on the device"
        )


def _check_data_parallel(cfg: Config, world_size: int) -> None:
    """Each rank takes an equal share of a step (`world_size` from the launcher's WORLD_SIZE)."""
    t = cfg.train
    rows = 1 if t.micro_batch_tokens else t.micro_batch_size  # a token budget splits any rows
    per = "" if t.micro_batch_tokens else f" x train.micro_batch_size ({t.micro_batch_size})"
    if world_size > 1 and cfg.stage == "sft" and not splits_evenly(t.batch_size, world_size * rows):
        raise UserError(
            f"train.batch_size ({t.batch_size}) must be divisible by the world size "
            f"({world_size}){per}: each rank takes "
            f"batch_size / {world_size} examples per step in whole micro-batches"
        )
    if world_size > 1 and cfg.stage == "rl":
        g = cfg.generation.num_samples_per_prompt
        per_rank = t.prompts_per_step // world_size
        if t.prompts_per_step % world_size or not splits_evenly(per_rank * g, rows):
            raise UserError(
                f"train.prompts_per_step ({t.prompts_per_step}) must be divisible by the world "
                f"size ({world_size}), and each rank's rows (prompts_per_step / {world_size} x "
                f"generation.num_samples_per_prompt {g}) by train.micro_batch_size "
                f"({t.micro_batch_size}): a prompt's whole group stays on one rank"
            )
    s = cfg.stability
    transforms = {
        "stability.adaptive_grad_clip.enabled": s.adaptive_grad_clip.enabled,
        "stability.grad_centralization": s.grad_centralization,
        "stability.grad_normalization.enabled": s.grad_normalization.enabled,
    }
    used = [k for k, on in transforms.items() if on]
    parallel = cfg.distributed.enabled or world_size > 1
    if cfg.distributed.backend == "deepspeed" and used and parallel:
        raise UserError(
            f"{', '.join(used)}: not applied under distributed.backend=deepspeed (the engine owns "
            "the gradients and clips by optim.max_grad_norm); use backend ddp or fsdp"
        )


def check_world_size(cfg: Config, world_size: int) -> None:
    """The data-parallel checks for a given world size (`moepost plan --gpus N` runs them)."""
    _check_data_parallel(cfg, world_size)


def _check_router_module(cfg: Config) -> None:
    spec = cfg.moe.router_module
    if spec is not None and (not spec.strip() or spec != spec.strip() or spec.startswith(".")):
        raise UserError(
            f"moe.router_module = {spec!r}: expected a router class name (e.g. G3MoeTopkRouter) "
            "or an attribute path (e.g. mlp.gate)"
        )
