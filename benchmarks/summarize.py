"""Attention-rollout extractive summaries vs lead-k and random selection, on real long English text.

Text: the longest topics of Python's bundled language reference (``pydoc_data.topics``, offline). Score: cosine
similarity between the embedding of the summary and that of the whole document (all-MiniLM-L6-v2, mean pooling
over windows; see ``attnkit.text.summarize.embed``). Random: mean of 10 draws. Same number of sentences for all.

    python benchmarks/summarize.py [--topics 6] [--ratio 0.1]
"""

from __future__ import annotations

import argparse
import math
import pydoc_data.topics as topics
import random
import statistics

from attnkit.text import load_text_model
from attnkit.text.summarize import embed, split_sentences, summarize


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topics", type=int, default=6, help="how many of the longest topics")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--draws", type=int, default=10, help="random selections per topic")
    args = parser.parse_args(argv)
    tm = load_text_model(None)
    names = sorted(topics.topics, key=lambda k: -len(topics.topics[k]))[: args.topics]
    rows = []
    print("| topic | sentences | kept | attention (rollout) | lead-k | random (mean of draws) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        text = topics.topics[name]
        sentences = split_sentences(text)
        doc = embed(tm, sentences)
        k = max(1, math.ceil(args.ratio * len(sentences)))

        def score(idx, sentences=sentences, doc=doc):
            return float(embed(tm, [sentences[i] for i in sorted(idx)]) @ doc)

        ours = score(summarize(tm, text, ratio=args.ratio).selected)
        lead = score(range(k))
        rng = random.Random(0)
        rand = statistics.mean(score(rng.sample(range(len(sentences)), k)) for _ in range(args.draws))
        rows.append((ours, lead, rand))
        print(f"| {name} | {len(sentences)} | {k} | {ours:.3f} | {lead:.3f} | {rand:.3f} |", flush=True)
    means = [statistics.mean(col) for col in zip(*rows)]
    print(f"| **mean** | | | **{means[0]:.3f}** | **{means[1]:.3f}** | **{means[2]:.3f}** |")


if __name__ == "__main__":
    main()
