"""llm_core.layers."""
