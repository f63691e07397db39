"""Rollout engines (HF and vLLM), sampling, the KV cache, and how RL rows are laid out."""
