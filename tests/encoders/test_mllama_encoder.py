"""Mllama's tower attention without a mask (`encoders/mllama.py`): the rows in real-first order
and two unmasked SDPA calls give what transformers' aspect-ratio mask gives (every pair but two
padding rows); the whole tower against transformers is in `tests/sdk/test_mllama_parity.py`."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from polymodal.encoders.mllama import MllamaVisionAttention, _real_first

TILES, PATCHES, LENGTH = 4, 5, 8  # 5 patch rows a tile, padded to 8


@pytest.mark.parametrize("count", [1, 2, 4])
def test_real_rows_come_first_in_tile_order(count):
    order, back = _real_first(count, TILES, PATCHES, LENGTH, "cpu")
    rows = torch.arange(TILES * LENGTH)
    real = [r for r in rows.tolist() if r // LENGTH < count and r % LENGTH < PATCHES]
    padding = [r for r in rows.tolist() if r not in real]
    assert order.tolist() == real + padding
    assert torch.equal(order[back], rows)


def _attention(seed: int = 0) -> MllamaVisionAttention:
    torch.manual_seed(seed)
    attn = MllamaVisionAttention(SimpleNamespace(attention_heads=4, hidden_size=32))
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return attn.eval()


def _masked(attn: MllamaVisionAttention, x: torch.Tensor, real: int) -> torch.Tensor:
    """One SDPA call under the mask transformers builds: two padding rows never meet."""
    n, length, _ = x.shape
    q, k, v = (p(x).view(n, length, 4, 8).transpose(1, 2)
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # fmt: skip
    is_real = torch.arange(length) < real
    allowed = is_real[:, None] | is_real[None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return attn.o_proj(out.transpose(1, 2).reshape(n, length, -1))


def _rows(attn: MllamaVisionAttention, x: torch.Tensor, real: int) -> torch.Tensor:
    """The attention's output parts (real rows, then padding rows) as one tensor."""
    parts = attn(x, real)
    padding = [x.shape[1] - real] if real < x.shape[1] else []
    assert [p.shape[1] for p in parts] == [real] + padding
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("real", [5, 10, 20, 32])
def test_two_unmasked_calls_equal_the_masked_one(real):
    attn, x = _attention(), torch.randn(2, TILES * LENGTH, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            _rows(attn, x, real), _masked(attn, x, real), atol=1e-5, rtol=1e-5
        )


def test_padding_rows_see_only_the_real_rows():
    """A padding row's output does not move with the other padding rows' inputs; a real row's
    does (real queries attend to every key, as under transformers' mask)."""
    attn, real = _attention(1), 5
    x = torch.randn(1, TILES * LENGTH, 32)
    moved = x.clone()
    moved[:, real + 1 :] += torch.randn_like(moved[:, real + 1 :])
    with torch.no_grad():
        before, after = _rows(attn, x, real), _rows(attn, moved, real)
    torch.testing.assert_close(after[:, real], before[:, real], atol=1e-6, rtol=1e-6)
    assert (after[:, :real] - before[:, :real]).abs().max() > 1e-3
