"""Raw media -> tensors, and prompt building (chat template, slot expansion, M-RoPE positions)."""
