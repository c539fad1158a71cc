"""The C-Abstractor (`encoders/hcx_abstractor.py`, plain torch) against the published one built
from timm's `RegStage` (`tests/sdk/hcx_reference.py`): same parameter names, same outputs for
widths that change (a shortcut conv) or not, the prenorm and position embedding on and off, and
query counts whose adaptive pool windows overlap."""

import pytest
import torch

from polymodal.encoders.hcx_abstractor import CAbstractor
from tests.sdk.hcx_reference import CAbstractor as PublishedCAbstractor

SHAPES = {
    # (tokens, tower width, abstractor width, output width, queries, pos_emb, prenorm)
    "same_width": (16, 24, 24, 40, 9, True, False),
    "widening": (16, 16, 24, 40, 4, False, True),
    "real_ratio": (729, 8, 8, 12, 81, True, True),  # 27 x 27 tokens -> 9 x 9, as the 3B
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_timm_regstage(shape):
    tokens, width, hidden, out, queries, pos_emb, prenorm = SHAPES[shape]
    torch.manual_seed(0)
    published = PublishedCAbstractor(queries, tokens, width, hidden, out, pos_emb, prenorm)
    with torch.no_grad():
        for param in published.parameters():
            param.normal_(0.0, 0.3)
    ours = CAbstractor(tokens, width, hidden, out, pos_emb=pos_emb, prenorm=prenorm)
    assert sorted(ours.state_dict()) == sorted(published.state_dict())
    ours.load_state_dict(published.state_dict())
    x = torch.randn(3, tokens, width)
    with torch.no_grad():
        expected = published(x)
        got = ours(x, queries)
    assert got.shape == (3, queries, out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_other_query_counts_pool_the_same_stages():
    """A call with another query count (the published video path's fast frames) pools s1's map
    to that size and runs the same s2 and readout: equal to a published abstractor built for it."""
    torch.manual_seed(1)
    ours = CAbstractor(16, 8, 8, 12)
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0.0, 0.3)
    published = PublishedCAbstractor(1, 16, 8, 8, 12, True, False)
    published.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 1), published(x), rtol=1e-5, atol=1e-5)


def test_non_square_counts_are_refused():
    with pytest.raises(ValueError, match="square"):
        CAbstractor(16, 8, 8, 12)(torch.randn(1, 16, 8), 8)
