"""A first request of a new size compiles no Triton kernel variant mid-run (issue 13): kernels
whose integer arguments or pointers vary with image sizes or prompt lengths keep one compiled
variant across sizes whose values differ in what Triton specializes on (divisibility by 16,
16-byte alignment)."""

import pytest
import torch

from polymodal.llm_core.attention.causal_sdpa import _merge_kernel, merge_partials
from polymodal.processors.triton_pixels import _patchify_normalize_kernel, patchify_normalize

pytestmark = pytest.mark.gpu


def _variants(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def test_patchify_keeps_one_variant_across_image_sizes():
    before = _variants(_patchify_normalize_kernel)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    for height, width in ((448, 448), (1092, 1932), (756, 1316)):  # row strides 1344, 5796, 3948
        hwc = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, device="cuda")
        frames = hwc.permute(2, 0, 1)[None]  # a decoded image seen as CHW
        # an image's layout (plan_patches): t_patch 1, patch 14, merge 2, repeated twice in time
        out = patchify_normalize(frames, mean, std, (1, 14, 2, 2), torch.bfloat16)
        assert out.shape[0] == (height // 14) * (width // 14)
    assert _variants(_patchify_normalize_kernel) <= before + 1


def test_merge_keeps_one_variant_across_lengths_and_offsets():
    before = _variants(_merge_kernel)
    heads, d = 4, 128
    for tokens, offset in ((32, 0), (33, 3), (1100, 5), (48, 16)):
        out_a, out_b = torch.randn(2, tokens, heads, d, device="cuda", dtype=torch.bfloat16)
        lse = torch.randn(2, heads, tokens + offset, device="cuda")
        lse_a, lse_b = lse[0, :, offset:], lse[1, :, offset:]
        merged = merge_partials(out_a, lse_a, out_b, lse_b)
        share = torch.sigmoid(lse_a - lse_b).T[..., None]
        want = out_b.float() + share * (out_a.float() - out_b.float())
        torch.testing.assert_close(merged.float(), want, atol=2e-2, rtol=2e-2)
    assert _variants(_merge_kernel) <= before + 1


def test_mixed_steps_keep_one_variant_across_head_sizes():
    """A mixed step's decode rows (`AttentionMetadata.decode_split`) of any count: one unfused
    decode variant (one KV split) and no prefill variant per tail offset."""
    from polymodal.llm_core.attention import triton_backend, triton_decode, triton_prefill
    from tests.helpers import spec_for
    from tests.llm_core.test_mixed_step_split_gpu import _step

    backend = triton_backend.TritonAttentionBackend(causal_sdpa=False)
    counts = []
    for rows in (1, 3, 5, 40, 70):
        q, cache, meta = _step([1] * rows + [300, 17], [900] * rows + [1300, 17])
        backend.paged_attention(q, cache, meta, spec_for(q, cache, 128**-0.5))
        counts.append((_variants(triton_decode._decode_kernel),
                       _variants(triton_prefill._attn_fwd_kernel)))  # fmt: skip
    assert counts[-1] == counts[0], counts  # nothing new after the first mixed step
