"""Float32 golden model of GPT-2 / GPT-Neo, picoGPT style, with a KV cache.

Every function is pure NumPy on float32. Shapes use n = new tokens, t = cached + new tokens,
d = d_model, h = heads, hd = head_dim, f = d_ff, v = vocab.
"""

from __future__ import annotations

import math

import numpy as np

from gpt_fpga.contract.config import ModelConfig
from gpt_fpga.contract.numerics import visible_keys

_GELU_C = math.sqrt(2.0 / math.pi)  # a Python float: an np.float64 would promote float32 to float64


def gelu_new(x):  # [..] -> [..]; the tanh approximation used by GPT-2 and GPT-Neo
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def layer_norm(x, g, b, eps):  # [n, d] -> [n, d]
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g + b


def softmax(x):  # [.., t] -> [.., t]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, k, v, mask, scale):  # [h, n, hd], [h, t, hd], [h, t, hd], [n, t] -> [h, n, hd]
    scores = (q @ k.transpose(0, 2, 1)) * np.float32(scale)  # [h, n, t]
    scores = np.where(mask[None], scores, np.float32(-1e30))
    return softmax(scores) @ v


class KVCache:
    """Per-layer K and V, [h, n_ctx, hd] each, filled up to `length`."""

    def __init__(self, cfg: ModelConfig):
        shape = (cfg.n_layer, cfg.n_head, cfg.n_ctx, cfg.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.length = 0


def block(x, p, cfg: ModelConfig, layer: int, cache: KVCache, pos: int, observe=None):  # [n, d] -> [n, d]
    """One transformer layer.

    `observe(name, layer, value)`, if given, sees every intermediate; if it returns an array, that
    replaces the value (used to simulate quantization of chosen activations).
    """

    def tap(name, value):
        out = observe(name, layer, value) if observe else None
        return value if out is None else out

    n, d, h, hd = x.shape[0], cfg.d_model, cfg.n_head, cfg.head_dim
    pre = f"h{layer}."
    a = layer_norm(x, p[pre + "ln1_g"], p[pre + "ln1_b"], cfg.layer_norm_eps)
    a = tap("ln1", a)
    qkv = a @ p[pre + "w_qkv"] + p[pre + "b_qkv"]
    q, k, v = (qkv[:, i * d:(i + 1) * d].reshape(n, h, hd).transpose(1, 0, 2) for i in range(3))  # [h, n, hd]
    q, k, v = tap("q", q), tap("k", k), tap("v", v)
    cache.k[layer, :, pos:pos + n] = k
    cache.v[layer, :, pos:pos + n] = v
    t = pos + n
    window = cfg.window_size if cfg.local_layers[layer] else 0
    mask = visible_keys(np.arange(pos, t), t, window)  # [n, t]: the one definition of causal + local window
    scale = 1.0 / math.sqrt(hd) if cfg.scale_attn else 1.0
    ctx = attention(q, cache.k[layer, :, :t], cache.v[layer, :, :t], mask, scale).transpose(1, 0, 2).reshape(n, d)
    ctx = tap("ctx", ctx)
    x = x + ctx @ p[pre + "w_o"] + p[pre + "b_o"]
    x = tap("resid_attn", x)
    a = layer_norm(x, p[pre + "ln2_g"], p[pre + "ln2_b"], cfg.layer_norm_eps)
    a = tap("ln2", a)
    f = a @ p[pre + "w_fc"] + p[pre + "b_fc"]  # [n, f]
    f = tap("fc", f)
    g = gelu_new(f)
    g = tap("gelu", g)
    x = x + g @ p[pre + "w_proj"] + p[pre + "b_proj"]
    return tap("resid_mlp", x)


class FloatModel:
    """Stateful wrapper: ``forward(ids)`` runs new tokens through the model and extends the cache.

    The first call with the whole prompt is the prefill; later calls with one id are decode steps.
    Returns logits [n, vocab] for the new positions.
    """

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray]):
        self.cfg, self.p = cfg, params
        self.cache = KVCache(cfg)

    def reset(self):
        self.cache.length = 0

    @property
    def position(self) -> int:
        return self.cache.length

    def forward(self, ids, observe=None) -> np.ndarray:  # [n] -> [n, v]
        ids = np.asarray(ids, dtype=np.int64)
        pos, n = self.cache.length, len(ids)
        if pos + n > self.cfg.n_ctx:
            raise ValueError(f"position {pos + n} exceeds the context of {self.cfg.n_ctx}")
        x = self.p["wte"][ids] + self.p["wpe"][pos:pos + n]  # [n, d]
        for layer in range(self.cfg.n_layer):
            x = block(x, self.p, self.cfg, layer, self.cache, pos, observe)
        self.cache.length = pos + n
        x = layer_norm(x, self.p["lnf_g"], self.p["lnf_b"], self.cfg.layer_norm_eps)
        if observe:
            replaced = observe("lnf", self.cfg.n_layer, x)
            x = x if replaced is None else replaced
        logits = x @ self.p["wte"].T  # [n, v]
        assert logits.dtype == np.float32, logits.dtype
        return logits
