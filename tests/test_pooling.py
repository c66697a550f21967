import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skt.pooling import GEM_EPS, feature_names, pool, summarize, summary_kind


def _pooled(x, pooling):
    return pool(summarize(x, pooling).numpy(), summary_kind(x.ndim, pooling), pooling)


@pytest.fixture
def maps():
    return torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))


def test_avg_max_avgmax_match_torch(maps):
    avg = maps.mean((2, 3)).numpy()
    high = maps.amax((2, 3)).numpy()
    np.testing.assert_allclose(_pooled(maps, "avg"), avg, rtol=1e-6)
    np.testing.assert_allclose(_pooled(maps, "max"), high, rtol=1e-6)
    np.testing.assert_allclose(_pooled(maps, "avgmax"), np.hstack([avg, high]), rtol=1e-6)


def test_gem_by_hand(maps):
    expected = (maps.clamp(min=GEM_EPS) ** 3).mean((2, 3)) ** (1 / 3)
    np.testing.assert_allclose(_pooled(maps, "gem"), expected.numpy(), rtol=1e-5)
    ones = torch.ones(1, 2, 3, 3)
    np.testing.assert_allclose(_pooled(ones, "gem"), 1.0, rtol=1e-6)


def test_flatten_is_channel_major(maps):
    flat = _pooled(maps, "flatten")
    assert flat.shape == (2, 60)
    np.testing.assert_array_equal(flat[1, :20], maps[1, 0].flatten().numpy())


def test_vectors_pass_through_whatever_the_pooling():
    vectors = torch.randn(3, 7)
    for pooling in ("avg", "gem", "flatten"):
        np.testing.assert_array_equal(_pooled(vectors, pooling), vectors.numpy())


def test_tokens_pool_over_the_sequence():
    tokens = torch.randn(2, 9, 4)
    np.testing.assert_allclose(_pooled(tokens, "avg"), tokens.mean(1).numpy(), rtol=1e-6)


def test_five_dimensional_output_is_refused():
    with pytest.raises(ValueError, match="with 5 dimensions"):
        summarize(torch.zeros(1, 2, 3, 4, 5), "avg")


def test_summary_is_float32_and_three_per_channel(maps):
    summary = summarize(maps.double(), "avg")
    assert summary.dtype == torch.float32 and summary.shape == (2, 9)


def test_feature_names():
    assert feature_names("layer4", "stats", "avg", 6) == ["layer4_avg_0", "layer4_avg_1"]
    assert feature_names("l", "stats", "avgmax", 6) == ["l_avg_0", "l_avg_1", "l_max_0",
                                                       "l_max_1"]
    assert feature_names("pre_logits", "vector", "gem", 2) == ["pre_logits_0", "pre_logits_1"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=4, max_size=4),
       st.integers(1, 4))
def test_gem_lies_between_mean_and_max_of_clamped_values(values, channels):
    x = torch.tensor(values).reshape(1, 1, 2, 2).repeat(1, channels, 1, 1)
    clamped = x.clamp(min=GEM_EPS)
    gem = _pooled(x, "gem")
    assert np.all(gem >= clamped.mean((2, 3)).numpy() * (1 - 1e-5))
    assert np.all(gem <= clamped.amax((2, 3)).numpy() * (1 + 1e-5))
