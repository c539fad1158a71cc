"""llm_core.attention."""
