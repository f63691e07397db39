"""Typed configuration: one dataclass per section of DESIGN.md section 3.

Every field has a default so a config file only states what differs. Key names follow the
pipelines our users come from (`model.policy_name_or_path`, `data.train_file`,
`generation.num_samples_per_prompt`, `rl.algorithm`, `logging.output_dir`, ...).
`None` on an RL field means "take the algorithm preset" (see `algorithms.policy_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DataFormat = Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion", "text", "gsm8k"]
Algorithm = Literal["gspo", "grpo", "dapo", "dr_grpo", "reinforce", "rloo", "cispo"]
Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
RatioLevel = Literal["token", "sequence", "sequence_token", "none", "cispo"]


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # Attention / dense-MLP projections; "all-linear" is peft's shorthand for every linear layer.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    # transformers v5 stores expert weights as 3-D parameters; peft reaches them through
    # `target_parameters`, so experts are a separate switch.
    target_experts: bool = False
    target_router: bool = False


@dataclass
class ModelConfig:
    policy_name_or_path: str = ""
    reference_name_or_path: str | None = None
    tokenizer_name_or_path: str | None = None
    dtype: Dtype = "auto"
    attn_implementation: str | None = None
    experts_implementation: Literal[
        "auto", "eager", "grouped_mm", "batched_mm", "moepost_grouped"
    ] = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # The seed pipeline's explicit GPUs of a single-process run (one id each; components.placement)
    policy_gpu_ids: list[int] | None = None
    reference_gpu_ids: list[int] | None = None


@dataclass
class DataConfig:
    train_file: str | None = None
    eval_file: str | None = None
    dataset_name: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    eval_split: str | None = None
    format: DataFormat = "auto"
    prompt_key: str | None = None
    answer_key: str | None = None
    messages_key: str | None = None
    system_prompt: str | None = None
    prompt_template: str | None = None
    max_prompt_length: int = 512
    max_seq_length: int = 1024
    test_size: float = 0.0
    packing: bool = False
    streaming: bool = False
    # Visit the training rows in a seeded random order each epoch (false: file order).
    shuffle: bool = True
    # data.streaming: rows held in the shuffle buffer (the order is random within this window).
    shuffle_buffer_size: int = 1000
    # Non-streaming loader: refuse a source larger than this many bytes (null: no limit).
    max_in_memory_bytes: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class GenerationConfig:
    backend: Literal["hf", "vllm"] = "hf"
    num_samples_per_prompt: int = 4
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    micro_batch_size: int = 0
    eval_temperature: float = 0.0
    eval_max_new_tokens: int | None = None
    vllm_gpu_memory_utilization: float = 0.3


@dataclass
class RLConfig:
    algorithm: Algorithm = "gspo"
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    kl_coef: float | None = None
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    loss_aggregation: Aggregation | None = None
    num_policy_updates: int = 1
    advantage_std_normalize: bool | None = None
    dynamic_sampling: bool | None = None
    max_dynamic_sampling_rounds: int = 3
    overlong_shaping: bool | None = None
    overlong_cache_length: int = 64
    # Training forwards run each micro-batch's shared prompt prefix once (G samples -> 1)
    shared_prefix: bool = True
    # The importance ratio policy_loss uses (None: the algorithm preset's)
    ratio_level: RatioLevel | None = None


@dataclass
class MoEConfig:
    # None: the checkpoint's own `router_aux_loss_coef` (what it was pre-trained with).
    router_aux_loss_coef: float | None = None
    aux_loss_scope: Literal["micro_batch", "global"] = "micro_batch"
    aux_loss_tokens: Literal["all", "completion"] = "all"
    router_z_loss_coef: float = 0.0
    monitor_expert_utilization: bool = True
    collapse_entropy_threshold: float = 0.5
    collapse_dead_threshold: int = 1
    routing_replay: Literal["none", "r2", "r3"] = "none"
    freeze_router: bool = False
    # A router moepost has not verified: its class name ("G3MoeTopkRouter") or attribute path
    # ("mlp.gate"); None: verified classes, else found by shape (docs/moe.md, custom routers).
    router_module: str | None = None


@dataclass
class RewardConfig:
    # Each entry: {name: gsm8k, method: strict, weight: 1.0}; keys other than name/weight are
    # passed to the function as keyword arguments.
    functions: list[dict[str, Any]] = field(default_factory=list)
    metricx: dict[str, Any] = field(default_factory=dict)
    xcomet: dict[str, Any] = field(default_factory=dict)
    # Seconds one reward call may take before its batch scores None (counted as timeouts);
    # null: no limit (and calls run in the training thread). See docs/rl.md#fault-handling.
    timeout_s: float | None = 600.0


@dataclass
class OptimConfig:
    learning_rate: float = 1e-5
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    master_weights: Literal["none", "fp32"] = "none"
    stochastic_rounding: bool = False


# The token budget of a config that says nothing about micro-batches. GSPO, 8 prompts x G=8 x
# 64 new tokens, 4 steps, bench model, 1 thread, one run each: one row per forward (the old
# default) 67.1 s and 1037 MB peak RSS; 1024 tokens 39.1 s, 1349 MB; 2048 tokens 33.6 s,
# 1582 MB; TRL (8-row micro-batches) 117.7 s, 1418 MB. 1024 is the largest that stayed under
# TRL's peak.
DEFAULT_MICRO_BATCH_TOKENS = 1024
MICRO_BATCH_KEYS = ("micro_batch_size", "micro_batch_tokens", "gradient_accumulation_steps")


@dataclass
class TrainConfig:
    max_steps: int = 0
    num_epochs: float = 1.0
    prompts_per_step: int = 8
    batch_size: int = 8
    micro_batch_size: int = 1
    # > 0: micro-batches hold as many rows as fit this many padded tokens (replaces
    # micro_batch_size); verl's use_dynamic_bsz + ppo_max_token_len_per_gpu. A config file
    # that sets none of micro_batch_size / micro_batch_tokens / gradient_accumulation_steps
    # gets DEFAULT_MICRO_BATCH_TOKENS (`config.load.load_config`).
    micro_batch_tokens: int = 0
    gradient_accumulation_steps: int | None = None
    eval_every: int = 0
    save_every: int = 0
    # SIGTERM / SIGINT: finish the step and write a checkpoint before exiting (143 / 130)
    save_on_signal: bool = True
    seed: int = 42
    eval_metric: str | None = None
    # > 0: the LM head runs this many scored tokens at a time inside the loss and again in
    # backward (no [B, T, V] logits); 0: full logits, as before
    lm_head_chunk_rows: int = 256


@dataclass
class AdaptiveGradClipConfig:
    enabled: bool = False
    mode: Literal["global", "per_tensor"] = "global"
    ema_beta: float = 0.99
    coef: float = 1.5
    warmup_steps: int = 0


@dataclass
class GradNormalizationConfig:
    enabled: bool = False
    alpha: float = 0.5


@dataclass
class StabilityConfig:
    adaptive_grad_clip: AdaptiveGradClipConfig = field(default_factory=AdaptiveGradClipConfig)
    grad_centralization: bool = False
    grad_normalization: GradNormalizationConfig = field(default_factory=GradNormalizationConfig)
    logits_clip: float | None = None
    logprob_min: float | None = None
    skip_nonfinite: bool = True
    max_consecutive_skips: int = 5


@dataclass
class NoiseInjectionConfig:
    enabled: bool = False
    sigma_start: float = 1e-2
    sigma_end: float = 1e-3
    num_stages: int = 10
    target_modules: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class DistributedConfig:
    enabled: bool = False
    backend: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    deepspeed_config_path: str | None = None
    fsdp_sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = (
        "FULL_SHARD"
    )
    # Experts split over this many ranks (FSDP2 only; see distributed/expert_parallel.py)
    expert_parallel_size: int = 1


@dataclass
class LoggingConfig:
    output_dir: str = "runs/moepost"
    report_to: list[str] = field(default_factory=list)
    log_every: int = 1
    save_rollouts: bool = False
    save_eval_outputs: bool = True
    keep_last_checkpoints: int = 2
    save_final: bool = True
    write_report: bool = True
    run_name: str | None = None
    # A fresh run in a folder holding an earlier run deletes that run's files first (else: error)
    overwrite_output_dir: bool = False


@dataclass
class MiscConfig:
    device: str = "auto"
    huggingface_cache_dir: str | None = None
    huggingface_token_env: str = "HF_TOKEN"
    num_threads: int | None = None


@dataclass
class Config:
    stage: Literal["sft", "rl"] = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    noise_injection: NoiseInjectionConfig = field(default_factory=NoiseInjectionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    misc: MiscConfig = field(default_factory=MiscConfig)
