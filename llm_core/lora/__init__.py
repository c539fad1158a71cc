"""LoRA adapters: PEFT directories, per-request adapters, batched multi-LoRA in one step.

`adapter.py` (LoRARequest, the PEFT loader), `manager.py` (slots and who holds them),
`layer.py` (the `LinearMethod` wrapper, the dense layers' folded storage and the step's
token -> slot mapping), `ops.py` (the torch reference), `triton_lora.py` (segmented shrink /
expand kernels), `triton_fold.py` (the expand of a shrink folded into the base GEMM) and
`engine_setup.py` (the manager an engine builds).
"""

from polymodal.llm_core.lora.adapter import LoRAAdapter, LoRARequest, load_adapter
from polymodal.llm_core.lora.manager import LoRAManager

__all__ = ["LoRAAdapter", "LoRAManager", "LoRARequest", "load_adapter"]
