"""The model configuration the whole contract is sized by: :class:`ModelConfig`, parsed from a
Hugging Face ``config.json`` and refused when we cannot run it, and the tensor shapes it implies.

Pure Python (json and dataclasses only), so the quantizer, both golden models, the gateware and the
board's driver can all import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, asdict
from pathlib import Path

from gpt_fpga.contract.errors import CheckpointError

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the same tanh formula

@dataclass(frozen=True)
class ModelConfig:
    family: str  # "gpt2" or "gpt_neo"
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    vocab_size: int
    n_ctx: int
    layer_norm_eps: float
    scale_attn: bool  # GPT-2 divides scores by sqrt(head_dim); GPT-Neo does not
    window_size: int  # GPT-Neo local window; 0 when no layer is local
    local_layers: tuple[bool, ...]  # per layer: True when attention is local
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        d = asdict(self)
        d["local_layers"] = list(self.local_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["local_layers"] = tuple(bool(x) for x in d["local_layers"])
        return cls(**d)

    def param_count(self) -> int:
        d, f = self.d_model, self.d_ff
        per_layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        if self.family == "gpt_neo":
            per_layer -= 3 * d  # q, k, v have no bias
        return self.vocab_size * d + self.n_ctx * d + self.n_layer * per_layer + 2 * d


def _int(cfg: dict, key: str, path: Path, default: int | None = None, minimum: int = 1) -> int:
    """An integer field >= minimum; `default` when absent or null (required when default is None)."""
    v = cfg.get(key)
    if v is None:
        if default is None:
            raise CheckpointError(f"{path}: config.json has no '{key}'")
        return default
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise CheckpointError(f"{path}: '{key}' must be an integer, got {v!r}")
    if v < minimum:
        raise CheckpointError(f"{path}: '{key}' must be >= {minimum}, got {v}")
    return int(v)


def parse_config(cfg: dict, path: Path = Path("config.json")) -> ModelConfig:
    """Turn a transformers config.json dict into a :class:`ModelConfig`, refusing what we cannot run."""
    model_type = cfg.get("model_type")
    if model_type not in ("gpt2", "gpt_neo"):
        raise CheckpointError(f"{path}: unsupported model_type '{model_type}' (supported: gpt2, gpt_neo)")
    act = cfg.get("activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(
            f"{path}: unsupported activation_function '{act}' (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    if model_type == "gpt2":
        if cfg.get("scale_attn_by_inverse_layer_idx"):
            raise CheckpointError(f"{path}: scale_attn_by_inverse_layer_idx=true is not supported")
        if cfg.get("add_cross_attention"):
            raise CheckpointError(f"{path}: add_cross_attention=true is not supported")
        n_layer = _int(cfg, "n_layer", path)
        d = _int(cfg, "n_embd", path)
        out = dict(family="gpt2", n_layer=n_layer, d_model=d, n_head=_int(cfg, "n_head", path),
                   d_ff=_int(cfg, "n_inner", path, default=4 * d), n_ctx=_int(cfg, "n_positions", path),
                   scale_attn=bool(cfg.get("scale_attn_weights", True)), window_size=0,
                   local_layers=(False,) * n_layer)
    elif model_type == "gpt_neo":
        n_layer = _int(cfg, "num_layers", path)
        d = _int(cfg, "hidden_size", path)
        kinds = []
        try:
            for pattern, repeat in cfg.get("attention_types") or [[["global"], n_layer]]:
                if isinstance(pattern, str) or not isinstance(repeat, int):
                    raise TypeError
                kinds += list(pattern) * repeat
        except (TypeError, ValueError):
            kinds = []
        if len(kinds) != n_layer or any(k not in ("global", "local") for k in kinds):
            raise CheckpointError(f"{path}: attention_types {cfg.get('attention_types')} does not give "
                                  f"'global'/'local' for each of {n_layer} layers")
        local = tuple(k == "local" for k in kinds)
        window = _int(cfg, "window_size", path, default=0, minimum=0)
        if any(local) and window < 1:
            raise CheckpointError(f"{path}: local attention layers need window_size >= 1")
        out = dict(family="gpt_neo", n_layer=n_layer, d_model=d, n_head=_int(cfg, "num_heads", path),
                   d_ff=_int(cfg, "intermediate_size", path, default=4 * d),
                   n_ctx=_int(cfg, "max_position_embeddings", path),
                   scale_attn=False, window_size=window if any(local) else 0, local_layers=local)
    if out["d_model"] % out["n_head"]:
        raise CheckpointError(f"{path}: hidden size {out['d_model']} is not divisible by {out['n_head']} heads")
    eos = cfg.get("eos_token_id")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise CheckpointError(f"{path}: 'layer_norm_epsilon' must be a number in (0, 1), got {eps!r}")
    return ModelConfig(vocab_size=_int(cfg, "vocab_size", path),
                       layer_norm_eps=float(eps),
                       eos_token_id=int(eos) if isinstance(eos, int) else None, **out)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor :func:`load_checkpoint` requires: HF name (without 'transformer.') -> shape as stored in the file.

    Buffers the loader ignores (attn.bias, masked_bias) and the optional tied lm_head.weight are not listed.
    """
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes = {"wte.weight": (v, d), "wpe.weight": (cfg.n_ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,)})
        if cfg.family == "gpt2":  # Conv1D: [in, out]
            shapes.update({p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                           p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                           p + "mlp.c_fc.weight": (d, f), p + "mlp.c_fc.bias": (f,),
                           p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,)})
        else:  # Linear: [out, in]
            a = p + "attn.attention."
            shapes.update({a + "q_proj.weight": (d, d), a + "k_proj.weight": (d, d), a + "v_proj.weight": (d, d),
                           a + "out_proj.weight": (d, d), a + "out_proj.bias": (d,),
                           p + "mlp.c_fc.weight": (f, d), p + "mlp.c_fc.bias": (f,),
                           p + "mlp.c_proj.weight": (d, f), p + "mlp.c_proj.bias": (d,)})
    return shapes


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a model is a Hugging Face directory with config.json "
                              f"and model.safetensors)")
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return parse_config(cfg, path)
