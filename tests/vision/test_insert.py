"""insert_attention: the copy keeps the original's shapes and state_dict keys, adds what the summary says, and refuses
`where` patterns and block kinds that cannot apply."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attnkit.ablation.cost import count_macs, count_parameters
from attnkit.nn import ResidualSelfAttention
from attnkit.vision import ECA, HybridResNet, SqueezeExcite, insert_attention

KINDS = [("se", {"reduction": 4}), ("eca", {}), ("cbam", {"reduction": 4}), ("nonlocal", {}),
         ("self_attention", {}), ("self_attention", {"num_heads": 4})]  # fmt: skip


def _plain_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def _resnet() -> HybridResNet:
    return HybridResNet(in_chans=1, num_classes=5, widths=(8, 16), depths=(1, 1), stem_stride=2)


def _check_copy(model, new, summary, x):
    old_state, new_state = model.state_dict(), new.state_dict()
    assert set(old_state) <= set(new_state)  # the original modules keep their keys...
    for key, value in old_state.items():
        assert torch.equal(new_state[key], value), key  # ...and their values
    missing = new.load_state_dict(old_state, strict=False).missing_keys  # the original checkpoint still loads
    added = {k for k in set(new_state) - set(old_state) if not k.endswith("num_batches_tracked")}  # optional in BN
    assert set(missing) == added
    assert count_parameters(new) - count_parameters(model) == summary.added_params > 0
    model.eval(), new.eval()
    with torch.no_grad():
        assert new(x).shape == model(x).shape
    assert summary.base_macs == count_macs(lambda: model(x))
    assert summary.macs == count_macs(lambda: new(x))
    assert summary.added_macs == sum(i.macs for i in summary.insertions)


@pytest.mark.parametrize(("kind", "kwargs"), KINDS)
def test_plain_sequential(kind, kwargs):
    torch.manual_seed(0)
    model, x = _plain_cnn(), torch.randn(2, 1, 12, 12)
    before = copy.deepcopy(model.state_dict())
    new, summary = insert_attention(model, kind, where=["1", "4"], example_input=x, **kwargs)
    assert [i.where for i in summary.insertions] == ["1", "4"]
    assert [i.shape for i in summary.insertions] == [(2, 8, 12, 12), (2, 16, 6, 6)]
    _check_copy(model, new, summary, x)
    assert not model[1]._forward_hooks and not hasattr(model[1], "inserted_attention")  # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("kind", "kwargs"), KINDS)
def test_resnet_blocks_by_name(kind, kwargs):
    torch.manual_seed(0)
    model, x = _resnet(), torch.randn(2, 1, 16, 16)
    new, summary = insert_attention(model, kind, where="stages.?.0", example_input=x, **kwargs)
    assert [(i.where, i.module_type, i.channels) for i in summary.insertions] == [
        ("stages.0.0", "BasicBlock", 8),
        ("stages.1.0", "BasicBlock", 16),
    ]
    _check_copy(model, new, summary, x)


def test_self_attention_starts_as_the_identity_and_blocks_run_once():
    torch.manual_seed(0)
    model, x = _resnet().eval(), torch.randn(2, 1, 16, 16)
    new, _ = insert_attention(model, "self_attention", where="stages.?", example_input=x)
    with torch.no_grad():
        torch.testing.assert_close(new.eval()(x), model(x))  # gamma = 0: nothing changes until it learns
    calls = []
    for m in new.modules():
        if isinstance(m, ResidualSelfAttention):
            m.register_forward_hook(lambda *a: calls.append(1))
    new(x)
    assert len(calls) == 2  # one block per stage, run once each (the Sequential got it appended, not hooked)


def test_types_sequences_and_summary_text():
    model = _plain_cnn()
    new, summary = insert_attention(model, "eca", where=nn.Conv2d)  # no example: channels from the attributes
    assert [i.where for i in summary.insertions] == ["0", "4"] and summary.added_macs is None
    assert isinstance(new[0].inserted_attention, ECA) and isinstance(new[4].inserted_attention, ECA)
    text = str(summary)
    assert "insert_attention('eca'): 2 block(s)" in text and "added parameters: 6" in text
    new, summary = insert_attention(model, "se", where=[nn.BatchNorm2d, "4"], reduction=2)
    assert [i.where for i in summary.insertions] == ["1", "4"]
    assert isinstance(new[1].inserted_attention, SqueezeExcite)
    clone = copy.deepcopy(new).eval()  # hooks survive copies
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(clone(x), new.eval()(x))


class _Encoder(nn.Module):
    def __init__(self, batch_first: bool, conv: bool = False) -> None:
        super().__init__()
        self.batch_first, self.conv = batch_first, conv
        self.embed = nn.Embedding(11, 6)
        self.encoder = (
            nn.Conv1d(6, 10, 3, padding=1) if conv else nn.GRU(6, 5, batch_first=batch_first, bidirectional=True)
        )
        self.head = nn.Linear(10, 3)

    def forward(self, tokens):  # tokens (B, L)
        e = self.embed(tokens)  # (B, L, 6)
        if self.conv:
            states = self.encoder(e.transpose(1, 2)).transpose(1, 2)  # (B, L, 10)
        elif self.batch_first:
            states, _ = self.encoder(e)
        else:
            states = self.encoder(e.transpose(0, 1))[0].transpose(0, 1)
        return self.head(states.mean(1))


@pytest.mark.parametrize(("batch_first", "conv", "layout"), [(True, False, "BLC"), (False, False, "LBC"),
                                                               (True, True, "BCL")])  # fmt: skip
def test_sequence_encoders_get_single_head_attention(batch_first, conv, layout):
    torch.manual_seed(0)
    model, tokens = _Encoder(batch_first, conv), torch.randint(0, 11, (4, 9))
    new, summary = insert_attention(model, "self_attention", where="encoder", example_input=tokens)
    (ins,) = summary.insertions
    assert (ins.layout, ins.channels, ins.block) == (layout, 10, "ResidualSelfAttention")
    block = new.encoder.inserted_attention
    assert block.num_heads == 1
    with torch.no_grad():
        block.gamma.fill_(1.0)
    _check_copy(model, new, summary, tokens)
    assert not torch.allclose(new(tokens), model(tokens))  # the attention is on the path


def test_errors_name_the_argument():
    model = _plain_cnn()
    with pytest.raises(ValueError, match=r"where='layer\*' matched no module of Sequential; its modules are: 0, 1"):
        insert_attention(model, "se", where="layer*")
    with pytest.raises(ValueError, match=r"where=<class 'torch\.nn\.modules\.rnn\.GRU'> matched no module"):
        insert_attention(model, "se", where=nn.GRU)
    with pytest.raises(ValueError, match="unknown kind 'sk'; valid: 'se', 'eca'"):
        insert_attention(model, "sk", where="0")
    with pytest.raises(TypeError, match="expected where to be a module name pattern"):
        insert_attention(model, "se", where=[3])
    with pytest.raises(ValueError, match=r"cannot tell the output channels of 2 \(ReLU\).*example_input"):
        insert_attention(model, "se", where="2")
    with pytest.raises(ValueError, match=r"kind 'se' needs a feature map .* gives layout BLC"):
        insert_attention(_Encoder(True), "se", where="encoder")
    with pytest.raises(ValueError, match=r"8 \(Linear\) returns shape \(2, 5\); pass layout="):
        insert_attention(model, "self_attention", where="8", example_input=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="ModuleList/ModuleDict that is never called"):
        insert_attention(nn.Sequential(nn.ModuleList([nn.Conv2d(1, 2, 1)])), "se", where="0")
