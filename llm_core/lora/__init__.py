"""LoRA adapters: PEFT directories, per-request adapters, batched multi-LoRA in one step.

`adapter.py` (LoRARequest, the PEFT loader), `manager.py` (slots and who holds them),
`layer.py` (the `LinearMethod` wrapper and the step's token -> slot mapping), `ops.py` (the
torch reference) and `triton_lora.py` (segmented shrink / expand kernels).
"""

from polymodal.llm_core.lora.adapter import LoRAAdapter, LoRARequest, load_adapter
from polymodal.llm_core.lora.manager import LoRAManager

__all__ = ["LoRAAdapter", "LoRAManager", "LoRARequest", "load_adapter"]
