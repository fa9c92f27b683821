"""Small random-weight Hugging Face checkpoints, written with NumPy (no torch, no transformers).

Tests and benchmarks need model directories that :func:`host.checkpoint.load_checkpoint` accepts
without shipping weights. Every tensor name and shape comes from :func:`host.checkpoint.expected_shapes`,
so what is written here is exactly what the loader expects, for both families::

    cfg = make_config("gpt_neo", vocab=64, d=32, heads=2, layers=2, n_ctx=32,
                      attention_types=[[["local", "global"], 1]], window_size=3)
    write_checkpoint(tmp / "m", cfg, random_tensors(cfg, seed=3), tokenizer_json=KJV_TOKENIZER)

``config`` is always a transformers-style ``config.json`` dict (``model_type``, ``n_embd`` /
``hidden_size``, ...), the same dict that is written to disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from gpt_fpga.contract.config import expected_shapes, parse_config

_LN_GAINS = ("ln_1.weight", "ln_2.weight", "ln_f.weight")


def make_config(family: str, *, vocab: int, d: int, heads: int, layers: int, n_ctx: int, d_ff: int | None = None,
                attention_types: list | None = None, window_size: int = 0, **extra) -> dict:
    """A transformers ``config.json`` dict for ``family`` ("gpt2" or "gpt_neo").

    ``d_ff`` defaults to 4 * d (the key is then left out, as transformers does). GPT-Neo only (ignored
    for gpt2): ``attention_types`` in the transformers format (e.g. ``[[["global", "local"], 1]]``),
    all-global layers by default, and ``window_size``. ``extra`` keys are added last and override the
    defaults (``activation_function="gelu_new"``, ``layer_norm_epsilon=1e-5``, ``eos_token_id=0``,
    ``bos_token_id=0``).
    """
    if family == "gpt2":
        cfg = {"model_type": "gpt2", "vocab_size": vocab, "n_embd": d, "n_head": heads, "n_layer": layers,
               "n_positions": n_ctx}
        if d_ff is not None:
            cfg["n_inner"] = d_ff
    elif family == "gpt_neo":
        cfg = {"model_type": "gpt_neo", "vocab_size": vocab, "hidden_size": d, "num_heads": heads,
               "num_layers": layers, "max_position_embeddings": n_ctx,
               "attention_types": attention_types or [[["global"], layers]], "window_size": window_size}
        if d_ff is not None:
            cfg["intermediate_size"] = d_ff
    else:
        raise ValueError(f"unknown family {family!r} (gpt2 or gpt_neo)")
    cfg.update(activation_function="gelu_new", layer_norm_epsilon=1e-5, eos_token_id=0, bos_token_id=0)
    cfg.update(extra)
    return cfg


def random_tensors(config: dict, seed: int = 0, std: float = 0.2, ln_jitter: bool = True,
                   prefix: str = "transformer.") -> dict[str, np.ndarray]:
    """Every tensor the loader expects for ``config``, float32 ~ N(0, std), in the file's layout.

    Names and shapes are those of :func:`host.checkpoint.expected_shapes` (GPT-2 Conv1D ``[in, out]``,
    GPT-Neo Linear ``[out, in]`` with bias-free q/k/v), each prefixed with ``prefix``. LayerNorm gains
    are ``1 + N(0, std)`` with ``ln_jitter`` and exactly 1 without; all other tensors, LayerNorm biases
    included, are ``N(0, std)``. Deterministic in ``seed``; the arrays are fresh and writable.
    """
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(parse_config(config)).items():
        if name.endswith(_LN_GAINS) and not ln_jitter:
            arr = np.ones(shape, np.float32)
        else:
            arr = rng.standard_normal(shape, dtype=np.float32)
            arr *= np.float32(std)
            if name.endswith(_LN_GAINS):
                arr += np.float32(1.0)
        tensors[prefix + name] = arr
    return tensors


def write_checkpoint(out_dir: str | Path, config: dict, tensors: dict[str, np.ndarray],
                     tokenizer_json: Path | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (and a copy of ``tokenizer_json``) into ``out_dir``.

    The directory is created if needed and existing files are overwritten. ``tensors`` is written as
    given (any names and dtypes), so a test may first delete, reshape or retype an entry.
    Returns ``out_dir`` as a Path.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "model.safetensors"))
    if tokenizer_json is not None:
        shutil.copy(tokenizer_json, out / "tokenizer.json")
    return out
