"""attnkit's AttnLRP / CP-LRP against the authors' implementation (``lxt``, Achtibat et al.) on a tiny Llama.

Same random Llama (transformers config, seed 0, float32), same prompt and explained logit (the last position's
predicted token). attnkit runs the model on ``attn_implementation="attnkit"`` with ``conserve=False`` (the
published rules, which is what ``lxt`` computes); ``lxt`` monkey-patches transformers' Llama classes and runs
eager attention, and its relevance is ``inputs_embeds ⊙ grad`` (Llama adds no position table: RoPE is inside
attention, so the first layer's input is the token embedding for both). ``lxt`` 2.1 on PyPI cannot be
installed here (it requires ``open_clip_torch``, hence torchvision, and its BERT module does not import with
transformers 5); the repository's current code does, without its dependencies::

    pip install --no-deps --target /tmp/lxt zennit \\
        "git+https://github.com/rachtibat/LRP-eXplains-Transformers@f04344177551bfcc3665e88afe96501f43fe560b"
    PYTHONPATH=/tmp/lxt python benchmarks/lrp_lxt.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings

import torch
import transformers as tf


def tiny_llama() -> torch.nn.Module:
    cfg = tf.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


def compare(rule: str) -> None:
    warnings.filterwarnings("ignore", module="lxt")
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.llama import attnLRP, cp_LRP
    from transformers.models.llama import modeling_llama

    from attnkit.explain.lrp import lrp
    from attnkit.integrations.transformers import register

    register()
    model = tiny_llama()
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        token = model(ids).logits[:, -1].argmax(-1)

    def score(out):
        return out.logits[:, -1].gather(1, token[:, None])[:, 0]

    model.set_attn_implementation("attnkit")
    ours = lrp(model, {"input_ids": ids}, score, rule=rule, conserve=False)
    conserved = lrp(model, {"input_ids": ids}, score, rule=rule)

    monkey_patch(modeling_llama, attnLRP if rule == "attnlrp" else cp_LRP)  # patches transformers' classes
    model.set_attn_implementation("eager")
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    score(model(inputs_embeds=embeds)).sum().backward()
    theirs = (embeds.detach() * embeds.grad).sum(-1).double()
    diff = (ours.relevance - theirs).abs().max() / theirs.abs().max()
    lxt_error = ((theirs.sum(-1) - ours.logit).abs() / ours.logit.abs()).max()
    print(
        f"{rule}: max |attnkit - lxt| / max |lxt| = {float(diff):.1e}; conservation error (max over 2 prompts): "
        f"lxt {float(lxt_error):.3f}, attnkit conserve=False {float(ours.conservation.max()):.3f}, "
        f"attnkit conserve=True {float(conserved.conservation.max()):.1e}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rule", choices=("attnlrp", "cp-lrp"), help="one rule in this process (lxt patches classes)")
    args = p.parse_args()
    if args.rule:
        compare(args.rule)
        return
    for rule in ("attnlrp", "cp-lrp"):
        subprocess.run([sys.executable, __file__, "--rule", rule], check=True)


if __name__ == "__main__":
    main()
