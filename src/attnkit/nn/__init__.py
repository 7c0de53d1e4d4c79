"""Attention modules: multi-head attention with a KV cache, classic encoder-decoder attention,
transformer layers and position encodings. Every dot-product attention here runs through
:func:`attnkit.attention`."""

from attnkit.nn.activations import ACTIVATIONS, register_activation
from attnkit.nn.additive import AdditiveAttention
from attnkit.nn.decoder_layer import TransformerDecoderLayer
from attnkit.nn.encoder_layer import TransformerEncoderLayer
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.local_attention import LocalAttention, LongformerAttention
from attnkit.nn.luong import LuongAttention
from attnkit.nn.multihead import MultiHeadAttention
from attnkit.nn.residual_self_attention import ResidualSelfAttention
from attnkit.nn.rotary import RotaryEmbedding
from attnkit.nn.sinusoidal import SinusoidalPositionalEncoding, sinusoidal_positions

__all__ = [
    "ACTIVATIONS",
    "AdditiveAttention",
    "KVCache",
    "LocalAttention",
    "LongformerAttention",
    "LuongAttention",
    "MultiHeadAttention",
    "ResidualSelfAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "register_activation",
    "sinusoidal_positions",
]
