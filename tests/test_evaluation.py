import math

import pytest
import torch

from perplib.evaluation import perplexity
from perplib.models import tiny_model


def direct_perplexity(model, ids, seqlen, windows):
    """Window by window, token by token: -log p(x_t | x_<t) from log-softmax, averaged."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
            logp = torch.log_softmax(model(chunk).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):
                total -= logp[t, chunk[0, t + 1]].item()
                count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("family", ["llama", "opt", "neox"])
def test_perplexity_matches_direct_computation(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (16 * 5 + 7,), generator=torch.Generator().manual_seed(0))
    out = perplexity(model, ids, seqlen=16, windows=3, batch_size=2)
    assert out["windows"] == 3 and out["tokens"] == 48 and out["windows_available"] == 5
    assert out["perplexity"] == pytest.approx(direct_perplexity(model, ids, 16, 3), rel=1e-4)
    every = perplexity(model, ids, seqlen=16, batch_size=4)
    assert every["windows"] == 5 and every["perplexity"] == pytest.approx(
        direct_perplexity(model, ids, 16, 5), rel=1e-4
    )


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="windows must be >= 1"):
        perplexity(model, torch.arange(64), 16, windows=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, torch.arange(10), 16)
