"""llm_core.models."""
