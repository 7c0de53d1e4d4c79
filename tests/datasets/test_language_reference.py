"""The language-reference text: three disjoint splits of whole topics that together cover every topic."""

from pydoc_data.topics import topics

import pytest

from attnkit.datasets import language_reference_text, language_reference_topics


def test_splits_are_disjoint_whole_topics_covering_everything():
    splits = {s: language_reference_topics(s) for s in ("train", "val", "test")}
    assert sorted(n for names in splits.values() for n in names) == sorted(topics)
    assert len(splits["test"]) == len(sorted(topics)[9::10]) and splits["val"] == sorted(topics)[4::10]
    text = language_reference_text("test")
    assert all(topics[n].strip("\n") in text for n in splits["test"])
    assert len(language_reference_text("train")) > 400_000  # real English text, offline


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        language_reference_text("dev")
