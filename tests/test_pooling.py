import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skt.pooling import (
    GEM_EPS,
    OutputFormat,
    feature_names,
    output_format,
    pool,
    summarize,
    summary_kind,
)


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


# ------------------------------------------------------- formats and tokens --

def test_output_format_tells_channels_last_from_channels_first():
    assert output_format((2, 7, 7, 96)) == OutputFormat("NHWC")
    assert output_format((2, 96, 7, 7)) == OutputFormat("NCHW")
    assert output_format((2, 7, 7, 7)) == OutputFormat("NCHW")  # undecidable: the default
    assert output_format((2, 10)) == OutputFormat("NC")


def test_output_format_counts_prefix_tokens_only_before_a_square_grid():
    assert output_format((2, 197, 8), 1, True) == OutputFormat("NTC", 1, True)
    assert output_format((2, 21, 8), 5, True) == OutputFormat("NTC", 5, True)  # 4 registers
    assert output_format((2, 196, 8), 1, True) == OutputFormat("NTC")  # the patch embedding
    assert output_format((2, 197, 8)) == OutputFormat("NTC")  # a network without a class token


def test_channels_last_maps_pool_over_height_and_width(maps):
    last = maps.permute(0, 2, 3, 1)  # (2, 4, 5, 3)
    form = OutputFormat("NHWC")
    for pooling in ("avg", "max", "gem", "avgmax", "flatten"):
        got = pool(summarize(last, pooling, form).numpy(), summary_kind(form, pooling), pooling)
        np.testing.assert_allclose(got, _pooled(maps, pooling), rtol=1e-6)


@pytest.fixture
def tokens():
    return torch.randn(2, 1 + 4 + 9, 3, generator=torch.Generator().manual_seed(1))


def test_token_poolings_by_hand(tokens):
    form = OutputFormat("NTC", prefix_tokens=5, class_token=True)  # a class token, 4 registers
    summary = summarize(tokens, "avg", form).numpy()
    assert summary_kind(form, "avg") == "tokens" and summary.shape == (2, 4 * 3)
    patches = tokens[:, 5:]
    cls, avg = tokens[:, 0].numpy(), patches.mean(1).numpy()
    expected = {
        "cls": cls,
        "avg": avg,
        "max": patches.amax(1).numpy(),
        "gem": ((patches.clamp(min=GEM_EPS) ** 3).mean(1) ** (1 / 3)).numpy(),
        "clsavg": np.hstack([cls, avg]),
        "avgmax": np.hstack([avg, patches.amax(1).numpy()]),
    }
    for pooling, want in expected.items():
        np.testing.assert_allclose(pool(summary, "tokens", pooling), want, rtol=1e-5)
    assert feature_names("blocks.1", "tokens", "clsavg", 12) == [
        "blocks.1_cls_0", "blocks.1_cls_1", "blocks.1_cls_2",
        "blocks.1_avg_0", "blocks.1_avg_1", "blocks.1_avg_2"]


def test_tokens_without_class_token_refuse_cls(tokens):
    summary = summarize(tokens, "avg").numpy()  # no prefix: every token is a patch
    np.testing.assert_allclose(pool(summary, "stats", "avg"), tokens.mean(1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="pooling='cls' needs a class token; this output has "
                                         "none"):
        pool(summary, "stats", "cls")
