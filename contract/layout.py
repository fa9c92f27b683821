"""How weights are laid out in DDR, in the order the accelerator streams them.

This module is the single source of the stream layout: the image writer, the golden model's
reader, `gpt-fpga info` and the cocotb testbenches all use it. See docs/image-format.md.

A matrix is streamed row by row (one row = one output channel). Each row is a header followed by
the row's weights, both padded to whole bus beats:

* header: bias int32 | multiplier uint16 | shift uint8 | reserved uint8 | int4 only: one uint8
  group scale per group of `group` inputs;
* weights: d_in int8 values, or d_in int4 values packed two per byte, low nibble first.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt_fpga.contract.config import ModelConfig

ROW_HEADER_FIXED_BYTES = 8  # bias int32, multiplier uint16, shift uint8, reserved uint8
ROW_HEADER_FIELDS = {"bias": (0, "<i4"), "mult": (4, "<u2"), "shift": (6, "u1")}  # byte offset, dtype
GROUP_SCALE_OFFSET = ROW_HEADER_FIXED_BYTES  # int4: uint8 group scales follow the fixed fields
# LayerNorm parameter word (the LayerNorm core's s_params beat): gamma_mult int16, beta int32
LN_PARAM_BYTES = 8
LN_GAMMA_BITS = (0, 16)
LN_BETA_BITS = (32, 64)
EMBED_SCALE_BYTES = 4  # host-only, per token: multiplier uint16, shift uint8, reserved


def header_bits(name: str) -> tuple[int, int]:
    """(lo, hi) bit slice of a row-header field within the first header beat."""
    off, dtype = ROW_HEADER_FIELDS[name]
    return 8 * off, 8 * (off + int(dtype[-1]))
BUS_BITS_CHOICES = (64, 128)
WEIGHT_FORMATS = ("int8", "int4")
GROUP_CHOICES = (32, 64, 128)
# int4's default group: the one with the fewest DDR bytes per token whose held-out cost stays
# within +0.6 % on both bundled models (bench/accuracy.py pick_int4_group; docs/numerics.md).
DEFAULT_GROUP = 128
SECTION_ALIGN = 4096  # page alignment: PYNQ's contiguous buffers and DMA bursts start on pages


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HwLayout:
    """The hardware parameters a weight image is tiled for."""

    bus_bits: int = 64
    weights: str = "int8"
    group: int = DEFAULT_GROUP  # int4 only: inputs per group scale

    @property
    def bus_bytes(self) -> int:
        return self.bus_bits // 8

    @property
    def weights_per_beat(self) -> int:
        return self.bus_bytes * (2 if self.weights == "int4" else 1)

    def header_beats(self, d_in: int) -> int:
        extra = ceil_div(d_in, self.group) if self.weights == "int4" else 0
        return ceil_div(ROW_HEADER_FIXED_BYTES + extra, self.bus_bytes)

    def weight_beats(self, d_in: int) -> int:
        return ceil_div(d_in, self.weights_per_beat)

    def row_beats(self, d_in: int) -> int:
        return self.header_beats(d_in) + self.weight_beats(d_in)

    def matrix_bytes(self, d_out: int, d_in: int) -> int:
        return d_out * self.row_beats(d_in) * self.bus_bytes

    def to_dict(self) -> dict:
        return {"bus_bits": self.bus_bits, "weights": self.weights, "group": self.group}


def layer_matrices(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of each matvec in one layer, in streaming order."""
    d, f = cfg.d_model, cfg.d_ff
    return [("qkv", 3 * d, d), ("attn_out", d, d), ("fc", f, d), ("proj", d, f)]


def decode_bytes_per_token(cfg: ModelConfig, hw: HwLayout, position: int | None = None) -> dict:
    """DDR bytes read per decoded token: weights streamed once, plus the int8 KV cache.

    `position` is the index of the token being decoded (default: the last one of the context).
    """
    t = cfg.n_ctx if position is None else position + 1
    weights = sum(hw.matrix_bytes(o, i) for _, o, i in layer_matrices(cfg)) * cfg.n_layer
    head = hw.matrix_bytes(cfg.vocab_size, cfg.d_model)
    kv = 0
    for layer in range(cfg.n_layer):
        visible = min(t, cfg.window_size) if cfg.local_layers[layer] else t
        kv += 2 * cfg.d_model * visible  # K and V rows, int8
    return {"weights": weights, "lm_head": head, "kv_cache": kv, "total": weights + head + kv,
            "position": t - 1}


def pack_matrix(w, group_scale, bias, mult, shift, hw: HwLayout) -> bytes:
    """Rows of (header, weights) as the hardware streams them; see the module docstring.

    w: [d_out, d_in] int8 values (int4 values in -8..7 for hw.weights == "int4");
    group_scale: [d_out, ceil(d_in / group)] uint8 (int4 only, else None);
    bias int32, mult uint16, shift uint8: [d_out].
    """
    import numpy as np

    w = np.asarray(w)
    d_out, d_in = w.shape
    B = hw.bus_bytes
    hdr = np.zeros((d_out, hw.header_beats(d_in) * B), np.uint8)
    for name, values in (("bias", bias), ("mult", mult), ("shift", shift)):
        off, dtype = ROW_HEADER_FIELDS[name]
        size = np.dtype(dtype).itemsize
        hdr[:, off:off + size] = np.asarray(values).astype(dtype).reshape(d_out, 1).view(np.uint8)
    body = np.zeros((d_out, hw.weight_beats(d_in) * B), np.uint8)
    if hw.weights == "int4":
        n_groups = ceil_div(d_in, hw.group)
        hdr[:, GROUP_SCALE_OFFSET:GROUP_SCALE_OFFSET + n_groups] = np.asarray(group_scale, dtype=np.uint8)
        nib = np.zeros((d_out, body.shape[1] * 2), np.uint8)
        nib[:, :d_in] = (w.astype(np.int16) & 0xF).astype(np.uint8)
        body[:] = nib[:, 0::2] | (nib[:, 1::2] << 4)
    else:
        body[:, :d_in] = w.astype(np.int8).view(np.uint8)
    return np.concatenate([hdr, body], axis=1).tobytes()


def unpack_matrix(blob, d_out: int, d_in: int, hw: HwLayout) -> dict:
    """Inverse of :func:`pack_matrix`: dict of w, group_scale (or None), bias, mult, shift arrays."""
    import numpy as np

    B = hw.bus_bytes
    hb, wb = hw.header_beats(d_in) * B, hw.weight_beats(d_in) * B
    _check_size(blob, d_out * (hb + wb), f"matrix stream of {d_out} x {d_in}")
    rows = np.frombuffer(blob, dtype=np.uint8).reshape(d_out, hb + wb)
    hdr, body = rows[:, :hb], rows[:, hb:]
    out = {"group_scale": None}
    for name, (off, dtype) in ROW_HEADER_FIELDS.items():
        size = np.dtype(dtype).itemsize
        out[name] = np.ascontiguousarray(hdr[:, off:off + size]).view(dtype)[:, 0].astype(np.int64)
    if hw.weights == "int4":
        out["group_scale"] = hdr[:, GROUP_SCALE_OFFSET:GROUP_SCALE_OFFSET + ceil_div(d_in, hw.group)].astype(np.int64)
        nib = np.empty((d_out, wb * 2), np.int64)
        nib[:, 0::2], nib[:, 1::2] = body & 0xF, body >> 4
        out["w"] = np.where(nib >= 8, nib - 16, nib)[:, :d_in]
    else:
        out["w"] = body[:, :d_in].view(np.int8).astype(np.int64)
    return out


class StreamSizeError(ValueError):
    """A section's byte count does not match what its shape needs."""


def _check_size(blob, expected: int, what: str):
    if len(blob) != expected:
        raise StreamSizeError(f"{what} needs {expected} bytes, the section has {len(blob)}")


def pack_ln_params(gamma_mult, beta) -> bytes:
    """One LN_PARAM_BYTES word per element: gamma_mult int16 in LN_GAMMA_BITS, beta int32 in LN_BETA_BITS."""
    import numpy as np

    words = np.zeros((len(gamma_mult), LN_PARAM_BYTES), np.uint8)
    g0, b0 = LN_GAMMA_BITS[0] // 8, LN_BETA_BITS[0] // 8
    words[:, g0:g0 + 2] = np.asarray(gamma_mult).astype("<i2").reshape(-1, 1).view(np.uint8)
    words[:, b0:b0 + 4] = np.asarray(beta).astype("<i4").reshape(-1, 1).view(np.uint8)
    return words.tobytes()


def unpack_ln_params(blob, d: int) -> tuple:
    """Inverse of :func:`pack_ln_params`: (gamma_mult, beta) int64 arrays of length d."""
    import numpy as np

    _check_size(blob, d * LN_PARAM_BYTES, f"LayerNorm parameters for d={d}")
    words = np.frombuffer(blob, dtype=np.uint8).reshape(d, LN_PARAM_BYTES)
    g0, b0 = LN_GAMMA_BITS[0] // 8, LN_BETA_BITS[0] // 8
    gamma = np.ascontiguousarray(words[:, g0:g0 + 2]).view("<i2")[:, 0].astype(np.int64)
    beta = np.ascontiguousarray(words[:, b0:b0 + 4]).view("<i4")[:, 0].astype(np.int64)
    return gamma, beta


def pack_embed_scale(mult, shift) -> bytes:
    import numpy as np

    out = np.zeros((len(mult), EMBED_SCALE_BYTES), np.uint8)
    out[:, 0:2] = np.asarray(mult).astype("<u2").reshape(-1, 1).view(np.uint8)
    out[:, 2] = np.asarray(shift).astype(np.uint8)
    return out.tobytes()


def unpack_embed_scale(blob, vocab: int) -> tuple:
    import numpy as np

    _check_size(blob, vocab * EMBED_SCALE_BYTES, f"embedding scales for {vocab} tokens")
    raw = np.frombuffer(blob, dtype=np.uint8).reshape(vocab, EMBED_SCALE_BYTES)
    return np.ascontiguousarray(raw[:, 0:2]).view("<u2")[:, 0].astype(np.int64), raw[:, 2].astype(np.int64)


def layer_section_names(layer: int) -> list[str]:
    """Per-layer sections of an image, in the order the hardware streams them."""
    return [f"L{layer}.{part}" for part in ("ln1", "qkv", "attn_out", "ln2", "fc", "gelu", "proj")]
