"""Read a Hugging Face GPT-2 / GPT-Neo checkpoint directory into one canonical form.

Everything downstream (float model, quantizer, CLI) sees only :class:`ModelConfig` and a
dict of float32 arrays with canonical names and the ``x @ W`` layout (``W`` is ``[in, out]``):

======================  ===============  ============================================
name                    shape            note
======================  ===============  ============================================
wte                     [vocab, d]       tied head: logits = lnf(x) @ wte.T
wpe                     [n_ctx, d]
h{i}.ln1_g / ln1_b      [d]
h{i}.w_qkv / b_qkv      [d, 3d] / [3d]   q, k, v concatenated on the out axis
h{i}.w_o / b_o          [d, d] / [d]
h{i}.ln2_g / ln2_b      [d]
h{i}.w_fc / b_fc        [d, d_ff]
h{i}.w_proj / b_proj    [d_ff, d] / [d]
lnf_g / lnf_b           [d]
======================  ===============  ============================================

Each tensor is read straight from the file into its own array (no memory map, no intermediate copy
for F32), so loading needs about one copy of the float32 weights in RAM, plus transients of one tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_fpga.contract.config import ModelConfig, expected_shapes, load_config
from gpt_fpga.contract.errors import CheckpointError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias")


class SafetensorsFile:
    """Lazy reader of one .safetensors file (F32, F16 and BF16): the header now, each tensor when asked.

    The format is an 8-byte little-endian header length, a JSON header of
    ``name -> {dtype, shape, data_offsets}``, then the data. We parse it ourselves because the
    ``safetensors`` numpy backend cannot return BF16, and so that truncation is named precisely.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, 100 << 20):
                    raise CheckpointError(f"{self.path}: corrupt or truncated safetensors file "
                                          f"(header claims {n} bytes, file has {size})")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror}") from None
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, meta in header.items():
            try:
                dtype, shape = meta["dtype"], tuple(int(s) for s in meta["shape"])
                begin, end = (int(o) for o in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt safetensors header entry for '{name}'") from None
            if not 0 <= begin <= end:
                raise CheckpointError(f"{self.path}: corrupt safetensors header entry for '{name}' "
                                      f"(data_offsets {begin}..{end})")
            if self.data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated: tensor '{name}' ends at byte "
                                      f"{self.data_start + end} but the file has {size} bytes")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def _read_into(self, arr: np.ndarray, name: str, begin: int, end: int) -> None:
        """Fill the C-contiguous `arr` with the tensor's bytes, read directly from the file."""
        buf = memoryview(arr.reshape(-1)).cast("B")
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                got = f.readinto(buf)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}': {e.strerror}") from None
        if got != end - begin:
            raise CheckpointError(f"{self.path}: truncated: tensor '{name}' has {got} of {end - begin} bytes")

    def get_float32(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array.

        F32 is read in place: the returned array is the only copy (a memory map would add the file's
        pages to the process's resident set next to the copy, doubling peak RSS).
        """
        dtype, shape, begin, end = self.entries[name]
        if dtype not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype} "
                                  f"(supported: F32, F16, BF16)")
        np_dtype = _DTYPES[dtype]
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * np.dtype(np_dtype).itemsize:
            raise CheckpointError(f"{self.path}: corrupt entry '{name}': {end - begin} bytes for shape {shape} {dtype}")
        raw = np.empty(shape, np_dtype)
        self._read_into(raw, name, begin, end)
        if dtype == "F32":
            return raw
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            wide = raw.astype(np.uint32)
            wide <<= 16
            return wide.view(np.float32)
        return raw.astype(np.float32)


def _canonical_name(name: str) -> str | None:
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    return name


@dataclass
class Checkpoint:
    config: ModelConfig
    params: dict[str, np.ndarray]
    tokenizer_path: Path | None
    path: Path


def load_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Load config, tensors (lazily mapped, converted to float32 canonical form) and tokenizer path."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise CheckpointError(f"{model_dir}: is a file (a weight image?); this takes a Hugging Face model "
                              f"directory with config.json and model.safetensors")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    cfg = load_config(model_dir)
    st_path = model_dir / "model.safetensors"
    if not st_path.is_file():
        raise CheckpointError(f"{st_path}: missing (only single-file safetensors checkpoints are supported)")
    st = SafetensorsFile(st_path)
    names = {}
    for raw in st.keys():
        canon = _canonical_name(raw)
        if canon is not None:
            names[canon] = raw
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in names:
            raise CheckpointError(f"{st_path}: missing tensor '{name}'")
        if st.shape(names[name]) != shape:
            raise CheckpointError(f"{st_path}: tensor '{names[name]}' has shape {list(st.shape(names[name]))}, "
                                  f"expected {list(shape)} from config.json")

    def get(name: str) -> np.ndarray:
        arr = st.get_float32(names[name])
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{st_path}: tensor '{names[name]}' holds NaN or Inf")
        return arr

    params = {"wte": get("wte.weight"), "wpe": get("wpe.weight"),
              "lnf_g": get("ln_f.weight"), "lnf_b": get("ln_f.bias")}
    if "lm_head.weight" in names:
        if st.shape(names["lm_head.weight"]) != expected["wte.weight"] or \
                not np.array_equal(get("lm_head.weight"), params["wte"]):
            raise CheckpointError(f"{st_path}: lm_head.weight differs from wte: untied heads are not supported")
    for i in range(cfg.n_layer):
        p, q = f"h.{i}.", f"h{i}."
        params[q + "ln1_g"], params[q + "ln1_b"] = get(p + "ln_1.weight"), get(p + "ln_1.bias")
        params[q + "ln2_g"], params[q + "ln2_b"] = get(p + "ln_2.weight"), get(p + "ln_2.bias")
        if cfg.family == "gpt2":
            params[q + "w_qkv"], params[q + "b_qkv"] = get(p + "attn.c_attn.weight"), get(p + "attn.c_attn.bias")
            params[q + "w_o"], params[q + "b_o"] = get(p + "attn.c_proj.weight"), get(p + "attn.c_proj.bias")
            params[q + "w_fc"] = get(p + "mlp.c_fc.weight")
            params[q + "w_proj"] = get(p + "mlp.c_proj.weight")
        else:
            a = p + "attn.attention."
            w = [get(a + n + "_proj.weight") for n in "qkv"]
            params[q + "w_qkv"] = np.ascontiguousarray(np.concatenate(w, axis=0).T)
            params[q + "b_qkv"] = np.zeros(3 * cfg.d_model, np.float32)
            params[q + "w_o"] = np.ascontiguousarray(get(a + "out_proj.weight").T)
            params[q + "b_o"] = get(a + "out_proj.bias")
            params[q + "w_fc"] = np.ascontiguousarray(get(p + "mlp.c_fc.weight").T)
            params[q + "w_proj"] = np.ascontiguousarray(get(p + "mlp.c_proj.weight").T)
        params[q + "b_fc"], params[q + "b_proj"] = get(p + "mlp.c_fc.bias"), get(p + "mlp.c_proj.bias")
    tok = model_dir / "tokenizer.json"
    return Checkpoint(cfg, params, tok if tok.is_file() else None, model_dir)
