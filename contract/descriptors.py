"""The descriptor table in DDR: per-layer parameters of the engine, defined once.

The host writes this table from a weight image (:func:`build_table`); the engine fetches the
model record and the record of the command it runs (``hw/engine.py`` slices fields by these very
offsets). Every integer is little-endian; every record is :data:`RECORD_BYTES` long, so one record
is a whole number of bus beats at 64 and 128 bits.

Table at ``DESC_ADDR`` (64-byte aligned)::

    record 0              MODEL  dimensions, buffer addresses, magic
    record 1 + i          LAYER i: section addresses, KV cache bases, attention scalars, LN shifts
    record 1 + n_layer    HEAD:  final LayerNorm and lm_head

KV cache: per layer, one K and one V region, each ``[n_head][n_ctx][kv_row_bytes]`` int8 rows,
``kv_row_bytes = head_dim`` rounded up to whole bus beats (padding bytes are written as 0). A head's
visible keys are therefore one contiguous range, streamed in one DMA transfer.

Buffers the engine writes (the residual, the logits, KV rows) are whole bus beats: the host allocates
them rounded up to beats, and the engine may write the padding.

Pure Python (struct only): the board's Python imports it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DESC_MAGIC = 0x44505447  # "GTPD" as a little-endian word: b"GTPD"
RECORD_BYTES = 64
DESC_ALIGN = 64

# (name, byte offset, struct format) per record kind. The engine reads these offsets.
MODEL_FIELDS = (
    ("magic", 0, "I"),
    ("n_layer", 4, "H"), ("n_head", 6, "H"),
    ("d_model", 8, "H"), ("head_dim", 10, "H"),
    ("d_ff", 12, "H"), ("n_ctx", 14, "H"),
    ("vocab", 16, "I"),
    ("resid_addr", 20, "I"),    # d_model int32: the residual vector, read and written by LAYER, read by HEAD
    ("logits_addr", 24, "I"),   # vocab int32: HEAD's output
    ("eps_addr", 28, "I"),      # LayerNorm eps table: numerics.LN_MAX_SHIFT + 1 entries, uint64 each
)
LAYER_FIELDS = (
    ("ln1_addr", 0, "I"), ("qkv_addr", 4, "I"), ("attn_out_addr", 8, "I"), ("ln2_addr", 12, "I"),
    ("fc_addr", 16, "I"), ("gelu_addr", 20, "I"), ("proj_addr", 24, "I"),
    ("k_cache_addr", 28, "I"), ("v_cache_addr", 32, "I"),
    ("score_mult", 36, "H"), ("ctx_mult", 38, "H"),
    ("score_shift", 40, "B"), ("ctx_shift", 41, "B"), ("ln1_shift", 42, "B"), ("ln2_shift", 43, "B"),
    ("window", 44, "H"),        # GPT-Neo local window, 1..n_ctx-1; 0 = global attention
)
HEAD_FIELDS = (
    ("lnf_addr", 0, "I"), ("lm_head_addr", 4, "I"),
    ("lnf_shift", 8, "B"),
)
RECORDS = {"model": MODEL_FIELDS, "layer": LAYER_FIELDS, "head": HEAD_FIELDS}


def field_bits(kind: str, name: str) -> tuple[int, int]:
    """(lsb, width) of a field within its record read as one little-endian integer."""
    for n, off, fmt in RECORDS[kind]:
        if n == name:
            return 8 * off, 8 * struct.calcsize(fmt)
    raise KeyError(f"{kind} record has no field {name!r}")


def pack_record(kind: str, values: dict) -> bytes:
    fields = RECORDS[kind]
    names = {n for n, _, _ in fields}
    unknown = set(values) - names
    if unknown:
        raise KeyError(f"{kind} record has no field(s) {sorted(unknown)}")
    buf = bytearray(RECORD_BYTES)
    for name, off, fmt in fields:
        struct.pack_into("<" + fmt, buf, off, int(values.get(name, 0)))
    return bytes(buf)


def unpack_record(kind: str, blob: bytes) -> dict:
    return {name: struct.unpack_from("<" + fmt, blob, off)[0] for name, off, fmt in RECORDS[kind]}


def record_offset(kind: str, layer: int = 0, n_layer: int = 0) -> int:
    """Byte offset of a record in the table."""
    if kind == "model":
        return 0
    if kind == "layer":
        return RECORD_BYTES * (1 + layer)
    return RECORD_BYTES * (1 + n_layer)


def table_bytes(n_layer: int) -> int:
    return RECORD_BYTES * (n_layer + 2)


def kv_row_bytes(head_dim: int, bus_bytes: int) -> int:
    return -(-head_dim // bus_bytes) * bus_bytes


def kv_region_bytes(n_head: int, n_ctx: int, head_dim: int, bus_bytes: int) -> int:
    """Bytes of one layer's K (or V) region."""
    return n_head * n_ctx * kv_row_bytes(head_dim, bus_bytes)


def kv_row_offset(head: int, position: int, n_ctx: int, head_dim: int, bus_bytes: int) -> int:
    return (head * n_ctx + position) * kv_row_bytes(head_dim, bus_bytes)


@dataclass(frozen=True)
class Placement:
    """Device addresses the host chose: where the image's sections and the engine's buffers lie."""

    sections: dict  # section name -> device address
    resid_addr: int
    logits_addr: int
    eps_addr: int
    k_cache: tuple  # per layer
    v_cache: tuple  # per layer


def eps_table_bytes(eps_table) -> bytes:
    return b"".join(struct.pack("<Q", int(e)) for e in eps_table)


def build_table(header: dict, place: Placement) -> bytes:
    """The descriptor table for an image header (image.Image.header) and its placement."""
    cfg = header["config"]
    n_layer = cfg["n_layer"]
    model = dict(magic=DESC_MAGIC, n_layer=n_layer, n_head=cfg["n_head"], d_model=cfg["d_model"],
                 head_dim=cfg["d_model"] // cfg["n_head"], d_ff=cfg["d_ff"], n_ctx=cfg["n_ctx"],
                 vocab=cfg["vocab_size"], resid_addr=place.resid_addr, logits_addr=place.logits_addr,
                 eps_addr=place.eps_addr)
    out = [pack_record("model", model)]
    for i, lh in enumerate(header["layers"]):
        s = place.sections
        out.append(pack_record("layer", dict(
            ln1_addr=s[f"L{i}.ln1"], qkv_addr=s[f"L{i}.qkv"], attn_out_addr=s[f"L{i}.attn_out"],
            ln2_addr=s[f"L{i}.ln2"], fc_addr=s[f"L{i}.fc"], gelu_addr=s[f"L{i}.gelu"], proj_addr=s[f"L{i}.proj"],
            k_cache_addr=place.k_cache[i], v_cache_addr=place.v_cache[i],
            score_mult=lh["score_mult"], ctx_mult=lh["ctx_mult"], score_shift=lh["score_shift"],
            ctx_shift=lh["ctx_shift"], ln1_shift=lh["ln1_shift"], ln2_shift=lh["ln2_shift"],
            window=lh["window"] if lh["window"] < cfg["n_ctx"] else 0)))  # a window >= n_ctx hides nothing
    out.append(pack_record("head", dict(lnf_addr=place.sections["lnf"], lm_head_addr=place.sections["lm_head"],
                                        lnf_shift=header["lnf_shift"])))
    return b"".join(out)


def _up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class StateLayout:
    """Offsets in the engine's state (everything but the weights), each 64-byte aligned; the K/V
    regions 4 KiB aligned and last, from ``kv_offset`` on, so they can live in a buffer of their own:
    the host never touches the KV cache, so that buffer needs no cache flush or invalidate (pynq's
    sync the whole buffer, and the KV cache is most of the state)."""

    desc: int
    eps: int
    resid: int
    logits: int
    k_cache: tuple
    v_cache: tuple
    total: int
    kv_offset: int


def plan_state(header: dict, bus_bytes: int) -> StateLayout:
    cfg = header["config"]
    d, v, n_layer = cfg["d_model"], cfg["vocab_size"], cfg["n_layer"]
    hd = d // cfg["n_head"]
    at = 0

    def take(size, align=DESC_ALIGN):
        nonlocal at
        at = _up(at, align)
        start, at = at, at + _up(size, bus_bytes)
        return start

    desc = take(table_bytes(n_layer))
    eps = take(8 * len(header["ln_eps_table"]))
    resid = take(4 * d)
    logits = take(4 * v)
    region = kv_region_bytes(cfg["n_head"], cfg["n_ctx"], hd, bus_bytes)
    kv_offset = _up(at, 4096)
    k = tuple(take(region, 4096) for _ in range(n_layer))
    vv = tuple(take(region, 4096) for _ in range(n_layer))
    return StateLayout(desc, eps, resid, logits, k, vv, _up(at, 4096), kv_offset)


def placement(header: dict, weights_base: int, state_base: int, state: StateLayout,
              kv_base: int | None = None) -> Placement:
    """Device addresses: the image's data region copied as it is to `weights_base` (sections keep
    their 4 KiB-aligned offsets), the state at `state_base`, and the K/V regions at `kv_base` (a
    buffer of ``total - kv_offset`` bytes) or, by default, after the rest of the state in one buffer."""
    sections = {s["name"]: weights_base + s["offset"] for s in header["sections"]}
    kv = state_base + state.kv_offset if kv_base is None else kv_base
    return Placement(sections=sections, resid_addr=state_base + state.resid, logits_addr=state_base + state.logits,
                     eps_addr=state_base + state.eps,
                     k_cache=tuple(kv + o - state.kv_offset for o in state.k_cache),
                     v_cache=tuple(kv + o - state.kv_offset for o in state.v_cache))
