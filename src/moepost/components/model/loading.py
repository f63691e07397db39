"""Loading the policy, the reference model and the tokenizer.

Models come from a local folder or from the local Hugging Face cache only: moepost never
downloads weights behind the user's back. `model.policy_name_or_path` may also be a PEFT adapter
folder (e.g. the `final/` of a LoRA SFT run); its base model is loaded and the adapter put on top.
LoRA (experts and routers included) and parameter accounting are in `lora`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from moepost.components.model.lora import apply_lora
from moepost.components.moe import experts
from moepost.config.schema import MiscConfig, ModelConfig
from moepost.errors import UserError

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_EXPERTS_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm", "batched_mm", "moepost_grouped")
ADAPTER_CONFIG = "adapter_config.json"


def resolve_device(name: str) -> torch.device:
    """`auto` -> this process's GPU (`cuda:$LOCAL_RANK` under a launcher) if there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(
            f"misc.device: '{name}' is not a device; use auto, cpu, cuda or cuda:N"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"misc.device: '{name}' was requested but CUDA is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on a GPU that supports it, float32 otherwise (CPU matmuls in bf16 are slow)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise UserError(f"model.dtype: '{name}' is not one of auto, float32, bfloat16, float16")
    return _DTYPES[name]


def _is_cached(name: str, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", ADAPTER_CONFIG):
        try:
            found = try_to_load_from_cache(name, filename, cache_dir=cache_dir)
        except Exception:  # an invalid repo id is simply "not cached"
            return False
        if isinstance(found, str):
            return True
    return False


def hub_kwargs(name: str, misc: MiscConfig, key: str) -> dict[str, Any]:
    """Keyword arguments for `from_pretrained` that forbid any download."""
    kwargs: dict[str, Any] = {"cache_dir": misc.huggingface_cache_dir}
    token = os.environ.get(misc.huggingface_token_env)
    if token:
        kwargs["token"] = token
    if os.path.isdir(name):
        return kwargs
    if not name or not _is_cached(name, misc.huggingface_cache_dir):
        where = misc.huggingface_cache_dir or "the default cache"
        raise UserError(
            f"{key}: '{name}' is not a local folder and is not in the Hugging Face cache ({where}); "
            "pass a local path, or download it first (e.g. `hf download NAME`)"
        )
    kwargs["local_files_only"] = True
    return kwargs


def _adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter folder, or None when `path` holds full weights."""
    config_file = Path(path) / ADAPTER_CONFIG
    if not config_file.is_file():
        return None
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{config_file}: base_model_name_or_path is missing, so the base model is unknown"
        )
    return base


def load_tokenizer(model_cfg: ModelConfig, misc: MiscConfig) -> Any:
    """The tokenizer of `tokenizer_name_or_path`, else of the policy (or its adapter's base).

    A missing pad token is set to the eos token; padding side is left to the caller.
    """
    from transformers import AutoTokenizer

    name = model_cfg.tokenizer_name_or_path or model_cfg.policy_name_or_path
    key = (
        "model.tokenizer_name_or_path"
        if model_cfg.tokenizer_name_or_path
        else "model.policy_name_or_path"
    )
    candidates = [name]
    base = _adapter_base(name) if os.path.isdir(name) else None
    if base is not None:
        candidates.append(base)  # an adapter folder need not carry the tokenizer
    last_error: Exception | None = None
    for candidate in candidates:
        kwargs = hub_kwargs(candidate, misc, key)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                candidate, trust_remote_code=model_cfg.trust_remote_code, **kwargs
            )
            break
        except (OSError, ValueError) as err:
            last_error = err
    else:
        first_line = str(last_error).strip().splitlines()[0] if last_error else ""
        raise UserError(f"{key}: no tokenizer could be loaded from '{name}' ({first_line})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(
    name: str, model_cfg: ModelConfig, misc: MiscConfig, *, key: str, dtype: torch.dtype
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = hub_kwargs(name, misc, key)
    if os.path.isdir(name) and not (Path(name) / "config.json").is_file():
        raise UserError(
            f"{key}: '{name}' holds no loadable model (no config.json or {ADAPTER_CONFIG})"
        )
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    impl = model_cfg.experts_implementation
    if impl not in _EXPERTS_IMPLEMENTATIONS:
        raise UserError(
            f"model.experts_implementation: '{impl}' is not one of {', '.join(_EXPERTS_IMPLEMENTATIONS)}"
        )
    # "auto" is resolved once the device is known (`experts.apply_experts_implementation`).
    if impl != "auto":
        if impl == experts.NAME:
            experts.register()
        kwargs["experts_implementation"] = impl
    try:
        return AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    except (ValueError, ImportError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        lowered = message.lower()
        if "experts" in lowered and impl != "auto":
            raise UserError(
                f"model.experts_implementation: '{impl}' cannot be used here ({message})"
            ) from err
        if "attn" in lowered or "attention" in lowered:
            raise UserError(
                f"model.attn_implementation: '{model_cfg.attn_implementation}' cannot be used ({message})"
            ) from err
        raise
    except OSError as err:
        first_line = str(err).strip().splitlines()[0]
        raise UserError(f"{key}: '{name}' holds no loadable model ({first_line})") from err


def _load_full_or_adapter(
    name: str,
    model_cfg: ModelConfig,
    misc: MiscConfig,
    *,
    key: str,
    dtype: torch.dtype,
    trainable_adapter: bool,
) -> nn.Module:
    """Full weights from `name`, or base model + the PEFT adapter that `name` holds."""
    base = _adapter_base(name) if os.path.isdir(name) else None
    if base is None:
        return _from_pretrained(name, model_cfg, misc, key=key, dtype=dtype)
    from peft import PeftModel

    model = _from_pretrained(
        base, model_cfg, misc, key=f"{name}/{ADAPTER_CONFIG} base_model_name_or_path", dtype=dtype
    )
    return PeftModel.from_pretrained(model, name, is_trainable=trainable_adapter)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass; non-reentrant so frozen inputs still pass grads."""
    # a transformers model (under PEFT): the checkpointing switches are its methods
    peft: Any = model
    base: Any = peft.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # With frozen embeddings (LoRA) the checkpointed blocks would otherwise get inputs without grad.
    base.enable_input_require_grads()
    base.config.use_cache = False


def load_policy(
    model_cfg: ModelConfig, misc: MiscConfig, *, device: torch.device, for_training: bool = True
) -> nn.Module:
    """The model to train (or evaluate), on `device`, LoRA-wrapped when `model.lora.enabled`.

    A policy path that is an adapter folder keeps training that adapter when LoRA is enabled
    (its own r / alpha / targets win over `model.lora`) and is merged into its base otherwise.
    """
    name = model_cfg.policy_name_or_path
    dtype = resolve_dtype(model_cfg.dtype, device)
    model = _load_full_or_adapter(
        name,
        model_cfg,
        misc,
        key="model.policy_name_or_path",
        dtype=dtype,
        trainable_adapter=for_training,
    )
    model.to(device)
    experts.apply_experts_implementation(model, model_cfg.experts_implementation, device)
    if hasattr(model, "peft_config") and not model_cfg.lora.enabled:
        # LoRA is off for this stage: the adapter becomes part of the weights being trained.
        model = cast(Any, model).merge_and_unload()  # a PeftModel
        model.requires_grad_(for_training)  # peft froze the base weights
    elif for_training and model_cfg.lora.enabled and not hasattr(model, "peft_config"):
        model = apply_lora(model, model_cfg.lora)
    if for_training and model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train(for_training)
    return model


def load_reference(
    model_cfg: ModelConfig,
    misc: MiscConfig,
    *,
    device: torch.device,
    needed: bool = True,
    policy: nn.Module | None = None,
) -> nn.Module | None:
    """A frozen copy of the starting policy for the KL term, or None when the recipe needs none.

    With LoRA on a full-weight base the reference is the policy with its adapter disabled, so no
    second model is loaded unless `model.reference_name_or_path` names one. `policy`, when given,
    is the freshly loaded, untrained policy: a reference of the same path is then copied from it
    in memory instead of read from disk a second time.
    """
    explicit = model_cfg.reference_name_or_path
    if not needed and not explicit:
        return None
    name = explicit or model_cfg.policy_name_or_path
    policy_is_adapter = os.path.isdir(name) and (Path(name) / ADAPTER_CONFIG).is_file()
    if model_cfg.lora.enabled and not explicit and not policy_is_adapter:
        return None
    if policy is not None and not explicit and _copyable(policy, model_cfg, device):
        return _frozen(copy.deepcopy(policy))
    key = "model.reference_name_or_path" if explicit else "model.policy_name_or_path"
    dtype = resolve_dtype(model_cfg.dtype, device)
    model = _load_full_or_adapter(
        name, model_cfg, misc, key=key, dtype=dtype, trainable_adapter=False
    )
    if hasattr(model, "merge_and_unload"):
        model = cast(Any, model).merge_and_unload()  # a PeftModel
    model.to(device)
    experts.apply_experts_implementation(model, model_cfg.experts_implementation, device)
    return _frozen(model)


def _copyable(policy: nn.Module, model_cfg: ModelConfig, device: torch.device) -> bool:
    """Whether a copy of the policy loaded from the reference's own path is exactly what loading
    it again would give: full weights (no LoRA wrapper, which also covers a LoRA run on an
    adapter folder), no checkpointing hooks, already on the reference's device."""
    if model_cfg.gradient_checkpointing or hasattr(policy, "peft_config"):
        return False
    return all(p.device == device for p in policy.parameters())


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model
