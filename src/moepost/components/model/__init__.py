"""Loading the policy / reference / tokenizer, LoRA, the chunked LM head, device placement."""
