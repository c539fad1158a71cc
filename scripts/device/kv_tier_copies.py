"""The host KV tier's copies on the GPU (`kv_offload.HostKVTier.run_pending`, batched) against
copying each block and layer on its own (the tier's first form): a 7B's pool (28 layers of
`[2, 2048, 16, 4, 128]` bf16), 125 blocks (a 2000-token prefix) saved to host slots and loaded
back, slots consecutive or scattered. Prints ms per 125-block save and load."""

import random
import time

import torch

from polymodal.llm_core.kv_offload import HostKVTier


def one_by_one(tier: HostKVTier, ops) -> None:
    for save, block, slot in ops:
        for device, host in zip(tier.tensors, tier.host):
            if save:
                host[slot].copy_(device[:, block], non_blocking=True)
            else:
                device[:, block].copy_(host[slot], non_blocking=True)


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


tensors = [torch.randn(2, 2048, 16, 4, 128, dtype=torch.bfloat16, device="cuda") for _ in range(28)]
tier = HostKVTier(tensors, 1024)
blocks = random.Random(0).sample(range(2048), 125)
for name, slots in (
    ("consecutive", list(range(125))),
    ("scattered", random.Random(1).sample(range(1024), 125)),
):
    for kind in (True, False):
        ops = [(kind, b, s) for b, s in zip(blocks, slots)]

        def batched(ops=ops):
            tier.pending = list(ops)
            tier.run_pending()

        b, o = timed(batched), timed(lambda ops=ops: one_by_one(tier, ops))
        label = "save" if kind else "load"
        print(f"{label} 125 blocks, slots {name}: batched {b:.2f} ms, one by one {o:.2f} ms")
ops = [(True, b, s) for b, s in zip(blocks, range(125))]
tier.pending = list(ops)
tier.run_pending()
want = [t[:, blocks].clone() for t in tensors]
for t in tensors:
    t.zero_()
tier.pending = [(False, b, s) for b, s in zip(blocks, range(125))]
tier.run_pending()
print("round trip exact:", all(torch.equal(t[:, blocks], w) for t, w in zip(tensors, want)))
