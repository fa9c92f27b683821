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

from host.checkpoint import ModelConfig

ROW_HEADER_FIXED_BYTES = 8  # bias int32, multiplier uint16, shift uint8, reserved uint8
BUS_BITS_CHOICES = (64, 128)
WEIGHT_FORMATS = ("int8", "int4")
GROUP_CHOICES = (32, 64, 128)
SECTION_ALIGN = 4096  # page alignment: PYNQ's contiguous buffers and DMA bursts start on pages


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HwLayout:
    """The hardware parameters a weight image is tiled for."""

    bus_bits: int = 64
    weights: str = "int8"
    group: int = 32  # int4 only: inputs per group scale

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
    hdr[:, 0:4] = np.asarray(bias, dtype="<i4").reshape(d_out, 1).view(np.uint8)
    hdr[:, 4:6] = np.asarray(mult, dtype="<u2").reshape(d_out, 1).view(np.uint8)
    hdr[:, 6] = np.asarray(shift, dtype=np.uint8)
    body = np.zeros((d_out, hw.weight_beats(d_in) * B), np.uint8)
    if hw.weights == "int4":
        n_groups = ceil_div(d_in, hw.group)
        hdr[:, 8:8 + n_groups] = np.asarray(group_scale, dtype=np.uint8)
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
    rows = np.frombuffer(blob, dtype=np.uint8, count=d_out * (hb + wb)).reshape(d_out, hb + wb)
    hdr, body = rows[:, :hb], rows[:, hb:]
    out = {"bias": np.ascontiguousarray(hdr[:, 0:4]).view("<i4")[:, 0].astype(np.int64),
           "mult": np.ascontiguousarray(hdr[:, 4:6]).view("<u2")[:, 0].astype(np.int64),
           "shift": hdr[:, 6].astype(np.int64), "group_scale": None}
    if hw.weights == "int4":
        out["group_scale"] = hdr[:, 8:8 + ceil_div(d_in, hw.group)].astype(np.int64)
        nib = np.empty((d_out, wb * 2), np.int64)
        nib[:, 0::2], nib[:, 1::2] = body & 0xF, body >> 4
        out["w"] = np.where(nib >= 8, nib - 16, nib)[:, :d_in]
    else:
        out["w"] = body[:, :d_in].view(np.int8).astype(np.int64)
    return out
