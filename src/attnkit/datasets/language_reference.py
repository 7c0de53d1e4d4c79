"""Real English text that ships with Python: the language-reference topics of ``pydoc_data.topics``.

About 465,000 characters of prose and code examples (the text behind ``help("if")``), offline. The topics are
split by name, not by position, so no held-out paragraph also appears in training: topics are sorted by name
and every tenth one (indices 9, 19, ...) is held out as ``"test"``, every tenth from index 4 as ``"val"``.
"""

from __future__ import annotations

__all__ = ["LANGUAGE_REFERENCE_SPLITS", "language_reference_text", "language_reference_topics"]

LANGUAGE_REFERENCE_SPLITS = ("train", "val", "test")


def language_reference_topics(split: str) -> list[str]:
    """Names of the ``pydoc_data.topics`` topics in ``split`` (sorted).

    Raises:
        ValueError: an unknown split.
    """
    from pydoc_data.topics import topics

    if split not in LANGUAGE_REFERENCE_SPLITS:
        raise ValueError(f"language_reference: unknown split {split!r}; valid: {', '.join(LANGUAGE_REFERENCE_SPLITS)}")
    names = sorted(topics)

    def which(i: int) -> str:
        return "test" if i % 10 == 9 else "val" if i % 10 == 4 else "train"

    return [n for i, n in enumerate(names) if which(i) == split]


def language_reference_text(split: str) -> str:
    """The text of the topics in ``split``, joined with blank lines (see the module docstring for the split).

    Raises:
        ValueError: an unknown split.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[n].strip("\n") for n in language_reference_topics(split)) + "\n"
