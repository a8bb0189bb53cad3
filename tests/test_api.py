"""The public API over a real store: streaming, stop conditions, errors."""

from __future__ import annotations

import pytest

import mer
from mer.errors import ConfigError


@pytest.fixture(scope="module")
def model(store_factory):
    return mer.open(store_factory("int4"), ram_budget="64MiB")


def test_stream_pieces_join_to_generate_text(model):
    kw = dict(max_tokens=24, temperature=0.8, seed=3)
    pieces = list(model.stream("def main():", **kw))
    done = model.generate("def main():", **kw)
    assert "".join(pieces) == done.text
    assert len(done.token_ids) == 24 and done.finish_reason == "length"
    assert done.text == model.tokenizer.decode(done.token_ids)


def test_stop_string_cuts_the_text(model):
    full = model.generate("x = ", max_tokens=24, temperature=1.0, seed=5).text
    assert len(full) > 6
    stop = full[3:6]
    done = model.generate("x = ", max_tokens=24, temperature=1.0, seed=5, stop=[stop])
    assert done.finish_reason == "stop"
    assert done.text == full[: full.find(stop)]
    assert "".join(model.stream("x = ", max_tokens=24, temperature=1.0, seed=5, stop=[stop])) \
        == done.text  # fmt: skip


def test_stop_token_ends_generation(model):
    first = model.generate("import os", max_tokens=8).token_ids
    end = first.index(first[-3])  # the stop token's first occurrence
    done = model.generate("import os", max_tokens=8, stop_token_ids=[first[end]])
    assert done.token_ids == first[: end + 1] and done.finish_reason == "stop"


def test_token_prompt_and_zero_tokens(model):
    assert model.generate([1, 5, 6], max_tokens=0).token_ids == []
    assert len(model.generate([1, 5, 6], max_tokens=3).token_ids) == 3


def test_prompt_errors(model):
    with pytest.raises(ConfigError, match="empty"):
        model.generate([], max_tokens=3)
    too_long = [5] * model.config.max_position_embeddings
    with pytest.raises(ConfigError, match="does not fit the context"):
        model.generate(too_long, max_tokens=3)
    with pytest.raises(ConfigError, match="temperature"):
        model.generate("x", temperature=-1)


def test_stats_count_what_happened(model):
    before = model.stats()
    p0, g0 = before.generation.prompt_tokens, before.generation.generated_tokens
    model.generate([1, 7, 8, 9], max_tokens=5)
    after = model.stats()
    assert after.generation.prompt_tokens - p0 == 4
    assert after.generation.generated_tokens - g0 == 5
    assert after.peak_rss_bytes > 0 and after.cache.hits + after.cache.misses > 0
