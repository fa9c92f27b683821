"""The host driver: streams each token through the engine one command at a time.

One code path for every device: the PYNQ board (``host/pynq_device.py``, later) and the Verilator
simulation of the engine (``host/rtl_device.py``) both implement :class:`Device`, which mirrors
pynq's ``MMIO.read/write``, ``allocate`` and ``Interrupt``.

Per token (``docs/engine.md``): the host embeds the token (the lm_head row rescaled, plus the
position row: the only arithmetic it does, exactly ``FixedModel.embed``), writes the int32 residual,
then for each layer programs COMMAND and starts, waits for the interrupt, and finally runs HEAD and
reads the int32 logits. Everything else (descriptors, KV cache, weights) stays in device memory.

Pure NumPy plus the contract: no amaranth, no cocotb (the board's Python has neither). The pack /
unpack steps (:func:`embed_row`, the descriptor table, :func:`check_identity`) are pure functions,
testable off the board.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from gpt_fpga.contract import descriptors as dsc
from gpt_fpga.contract import numerics as nx
from gpt_fpga.contract import registers as rm
from gpt_fpga.contract.errors import GptFpgaError, ImageError
from gpt_fpga.contract.image import FORMAT_VERSION, Image, data_start
from gpt_fpga.contract.layout import unpack_embed_scale, unpack_matrix

REG = rm.register
# A command may take this many times its roofline time at a 50 MHz engine clock before it is declared
# hung (plus a floor for the host's own latency). Simulated devices apply it in simulated time.
TIMEOUT_SLACK = 10.0
TIMEOUT_CLOCK_HZ = 50e6
TIMEOUT_FLOOR_S = 0.01


class Buffer(Protocol):
    """A DMA-able buffer: a NumPy uint8 array that also knows its device address."""

    device_address: int

    def flush(self) -> None: ...

    def invalidate(self) -> None: ...


class Device(Protocol):
    """What the driver needs from a device (pynq: MMIO, allocate, Interrupt)."""

    def read_reg(self, offset: int) -> int: ...

    def write_reg(self, offset: int, value: int) -> None: ...

    def allocate(self, nbytes: int) -> Buffer: ...

    def wait_interrupt(self, timeout_s: float) -> bool: ...

    def close(self) -> None: ...


class EngineError(GptFpgaError):
    """A command that ended with an error bit, or did not end in time."""


# ---- pure steps -------------------------------------------------------------------------------
def read_identity(read_reg) -> dict:
    """The identity registers, decoded."""
    out = {"ID": read_reg(REG("ID").offset)}
    for name in ("VERSION", "HW_CONFIG"):
        out[name] = REG(name).unpack(read_reg(REG(name).offset))
    for name in ("MAX_D_IN", "MAX_CONTEXT", "MAX_HEAD_DIM"):
        out[name] = read_reg(REG(name).offset)
    return out


def engine_ports(hw_config: dict) -> str:
    """How the engine reaches DDR, from HW_CONFIG: e.g. '2 ports of 64 bits'."""
    n = hw_config["ports"]
    return f"{n} port{'s' if n != 1 else ''} of {hw_config['bus_bits'] // max(n, 1)} bits"


def check_identity(ident: dict, header: dict, source: str = "the image") -> None:
    """Refuse an image the bitstream cannot run, naming the first mismatch and the fix."""
    if ident["ID"] != rm.ENGINE_MAGIC:
        raise EngineError(f"no gpt-fpga engine answers at the register base (ID reads 0x{ident['ID']:08x}, "
                          f"expected 0x{rm.ENGINE_MAGIC:08x}): wrong overlay or address")
    v, hw, cfg = ident["VERSION"], ident["HW_CONFIG"], header["config"]
    want_hw = header["hardware"]
    problems = []
    if v["regmap"] != rm.REGMAP_VERSION:
        problems.append(f"register map version {v['regmap']} (this driver speaks {rm.REGMAP_VERSION})")
    if v["contract"] != header.get("contract_version"):
        problems.append(f"integer contract version {v['contract']} (the image was made for "
                        f"{header.get('contract_version')})")
    if v["image_format"] != header.get("format_version", FORMAT_VERSION):
        problems.append(f"image format version {v['image_format']} (the image is {header.get('format_version')})")
    if hw["ports"] not in rm.PORT_CHOICES or (hw["ports"] == 2 and hw["bus_bits"] != 128):
        problems.append(f"{hw['ports']} read port(s) at {hw['bus_bits']} bits (this driver knows one port of "
                        f"64 or 128 bits, or two 64-bit ports at 128 bits)")
    elif hw["bus_bits"] != want_hw["bus_bits"]:
        problems.append(f"bus width {hw['bus_bits']} bits on {engine_ports(hw)} (the image is tiled for "
                        f"{want_hw['bus_bits']}: {'the two-port' if want_hw['bus_bits'] == 128 else 'a one-port'} "
                        f"engine)")
    codes = {c: n for n, c in rm.WEIGHT_CODES.items()}
    if codes.get(hw["weights"]) != want_hw["weights"] or \
            (want_hw["weights"] == "int4" and hw["group"] != want_hw["group"]):
        have = codes.get(hw["weights"], "?") + (f" (group {hw['group']})" if hw["group"] else "")
        need = want_hw["weights"] + (f" (group {want_hw['group']})" if want_hw["weights"] == "int4" else "")
        problems.append(f"weights {have} (the image has {need})")
    d, f, hd = cfg["d_model"], cfg["d_ff"], cfg["d_model"] // cfg["n_head"]
    if max(d, f) > ident["MAX_D_IN"]:
        problems.append(f"at most {ident['MAX_D_IN']} inputs per matvec (the model needs {max(d, f)})")
    if cfg["n_ctx"] > ident["MAX_CONTEXT"]:
        problems.append(f"a context of at most {ident['MAX_CONTEXT']} (the model has {cfg['n_ctx']})")
    if hd > ident["MAX_HEAD_DIM"]:
        problems.append(f"head_dim at most {ident['MAX_HEAD_DIM']} (the model has {hd})")
    if problems:
        raise EngineError(f"the engine does not match {source}: it has " + "; ".join(problems)
                          + ". Quantize the model for this engine (gpt-fpga quantize --weights/--group/--bus-bits) "
                            "or load the matching bitstream")


def embed_row(head_blob, row: int, d: int, hw) -> np.ndarray:
    """The effective integer weights of one lm_head row (the token's embedding before scaling)."""
    nbytes = hw.row_beats(d) * hw.bus_bytes
    m = unpack_matrix(head_blob[row * nbytes:(row + 1) * nbytes], 1, d, hw)
    w = m["w"] if m["group_scale"] is None else nx.expand_int4(m["w"], m["group_scale"], hw.group)
    return np.asarray(w, dtype=np.int64)[0]


def embed(head_blob, emb_mult, emb_shift, wpe_blob, token: int, pos: int, d: int, hw) -> np.ndarray:
    """The int32 residual entering layer 0: FixedModel.embed for one token, from the image's bytes."""
    w = embed_row(head_blob, token, d, hw)
    tok = nx.requantize(w, int(emb_mult[token]), int(emb_shift[token]), nx.RESID_BITS)
    wpe = np.frombuffer(wpe_blob, dtype="<i4", count=d, offset=4 * d * pos).astype(np.int64)
    return nx.residual_add(tok, wpe)


def command_timeouts(header: dict, hw) -> dict:
    """Seconds a LAYER (at the last position) and a HEAD may take before they count as hung."""
    from gpt_fpga.contract.config import ModelConfig
    from gpt_fpga.contract.layout import decode_bytes_per_token

    cfg = ModelConfig.from_dict(header["config"])
    per = decode_bytes_per_token(cfg, hw)
    layer_bytes = (per["weights"] + per["kv_cache"]) / cfg.n_layer
    return {name: TIMEOUT_FLOOR_S + TIMEOUT_SLACK * nbytes / hw.bus_bytes / TIMEOUT_CLOCK_HZ
            for name, nbytes in (("LAYER", layer_bytes), ("HEAD", per["lm_head"]))}


# ---- the driver -------------------------------------------------------------------------------
class Driver:
    """Runs a weight image on a device: ``reset()``, ``step(token) -> int32 logits``, ``position``."""

    def __init__(self, image: Image, device: Device, timeout_s: float | None = None):
        """`timeout_s`: per command; by default from the command's DDR traffic (command_timeouts)."""
        self.image, self.device = image, device
        h = image.header
        self.header = h
        cfg = h["config"]
        self.d, self.vocab, self.n_layer, self.n_ctx = cfg["d_model"], cfg["vocab_size"], cfg["n_layer"], cfg["n_ctx"]
        self.hw = image.hw
        self.identity = read_identity(device.read_reg)
        check_identity(self.identity, h, str(image.path))
        # host-side tables for the embedding (a few bytes per token; the weights stay in device memory)
        self.head_blob = image.section("lm_head")
        self.emb_mult, self.emb_shift = unpack_embed_scale(image.section("embed_scale"), self.vocab)
        self.wpe_blob = image.section("wpe")
        # device memory: the image's data region as it is, and the state buffer
        with open(image.path, "rb") as f:
            f.seek(data_start(image.header_length))
            data = f.read(h["data_size"])
        if len(data) != h["data_size"]:
            raise ImageError(f"{image.path}: truncated data region ({len(data)} of {h['data_size']} bytes)")
        self.state_layout = lay = dsc.plan_state(h, self.hw.bus_bytes)
        self.weights = device.allocate(len(data))
        self.state = device.allocate(lay.kv_offset)  # descriptors, eps, x, logits: flushed / invalidated
        self.kv = device.allocate(lay.total - lay.kv_offset)  # only the engine touches it: never synced
        self.weights[:len(data)] = np.frombuffer(data, np.uint8)
        self.weights.flush()
        self.place = dsc.placement(h, self.weights.device_address, self.state.device_address, lay,
                                   kv_base=self.kv.device_address)
        table = dsc.build_table(h, self.place)
        self._put(self.state_layout.desc, table)
        self._put(self.state_layout.eps, dsc.eps_table_bytes(h["ln_eps_table"]))
        self.state.flush()
        self.desc_addr = self.state.device_address + self.state_layout.desc
        self.length = 0
        self.last_stats: list[dict] = []  # per command of the last token: name, cycles, beats
        self.timeouts = command_timeouts(h, self.hw) if timeout_s is None else \
            {"LAYER": timeout_s, "HEAD": timeout_s}
        self.program()

    # -- memory helpers
    def _put(self, offset: int, data: bytes):
        self.state[offset:offset + len(data)] = np.frombuffer(data, np.uint8)

    def _get(self, offset: int, n: int) -> bytes:
        return self.state[offset:offset + n].tobytes()

    def program(self):
        """The registers a reset clears: descriptor table address and interrupt enable."""
        self.device.write_reg(REG("DESC_ADDR").offset, self.desc_addr)
        self.device.write_reg(REG("IRQ_ENABLE").offset, REG("IRQ_ENABLE").pack(done=1))

    # -- Backend-style interface
    def reset(self):
        """Start a new sequence. The KV cache needs no clearing: position t reads only rows 0..t,
        each written by this sequence first."""
        self.length = 0

    @property
    def position(self) -> int:
        return self.length

    def recover(self):
        """After an error: end a command that still runs (CONTROL.abort, a soft reset of the datapath),
        clear a pending interrupt, program the registers again and start a new sequence, so the next
        command starts from idle with no stale interrupt."""
        dev = self.device
        if REG("STATUS").unpack(dev.read_reg(REG("STATUS").offset))["busy"]:
            dev.write_reg(REG("CONTROL").offset, REG("CONTROL").pack(abort=1))
            dev.wait_interrupt(1.0)
        dev.write_reg(REG("IRQ_STATUS").offset, REG("IRQ_STATUS").pack(done=1))
        self.program()
        self.reset()

    def write_residual(self, x):
        self._put(self.state_layout.resid, np.asarray(x, dtype="<i4").tobytes())

    def read_residual(self) -> np.ndarray:
        self.state.invalidate()
        return np.frombuffer(self._get(self.state_layout.resid, 4 * self.d), "<i4").astype(np.int64)

    def read_logits(self) -> np.ndarray:
        self.state.invalidate()
        return np.frombuffer(self._get(self.state_layout.logits, 4 * self.vocab), "<i4").astype(np.int64)

    def embed(self, token: int, pos: int) -> np.ndarray:
        return embed(self.head_blob, self.emb_mult, self.emb_shift, self.wpe_blob, token, pos, self.d, self.hw)

    def run(self, op: int, layer: int = 0) -> dict:
        """Start one command and wait for it; raise EngineError naming it on an error or a timeout."""
        dev = self.device
        name = "HEAD" if op == rm.OP_HEAD else f"LAYER {layer}"
        timeout_s = self.timeouts["HEAD" if op == rm.OP_HEAD else "LAYER"]
        dev.write_reg(REG("COMMAND").offset, REG("COMMAND").pack(op=op, layer=layer))
        dev.write_reg(REG("CONTROL").offset, REG("CONTROL").pack(start=1))
        finished = dev.wait_interrupt(timeout_s)
        status = REG("STATUS").unpack(dev.read_reg(REG("STATUS").offset))
        if not finished or status["busy"]:
            where = self._where()
            dev.write_reg(REG("CONTROL").offset, REG("CONTROL").pack(abort=1))
            dev.wait_interrupt(1.0)
            dev.write_reg(REG("IRQ_STATUS").offset, REG("IRQ_STATUS").pack(done=1))
            raise EngineError(f"{name} at position {self.length} did not finish within {timeout_s:g} s "
                              f"(STATUS busy={status['busy']} done={status['done']}, {where}); the command was "
                              f"aborted")
        dev.write_reg(REG("IRQ_STATUS").offset, REG("IRQ_STATUS").pack(done=1))
        if status["error"]:
            errors = [k for k, v in REG("ERROR").unpack(dev.read_reg(REG("ERROR").offset)).items() if v]
            raise EngineError(f"{name} at position {self.length} ended with error {', '.join(errors) or '?'} "
                              f"({self._where()}): " + "; ".join(rm.ERROR_BITS[e] for e in errors))
        stats = {"command": name, "cycles": dev.read_reg(REG("CYCLES").offset),
                 "beats_read": dev.read_reg(REG("BEATS_READ").offset),
                 "beats_written": dev.read_reg(REG("BEATS_WRITTEN").offset)}
        self.last_stats.append(stats)
        return stats

    def _where(self) -> str:
        s = REG("STEP").unpack(self.device.read_reg(REG("STEP").offset))
        step = rm.STEPS[s["step"]] if s["step"] < len(rm.STEPS) else f"#{s['step']}"
        return f"step {step}" + (f", head {s['head']}" if step in ("scores_softmax", "context") else "")

    def step(self, token: int, observe=None) -> np.ndarray:
        """One token through every layer and the head; returns its int32 logits [vocab].

        `observe(layer, residual)` is called after each LAYER with the residual read back (compare)."""
        if not 0 <= token < self.vocab:
            raise GptFpgaError(f"token id {token} is out of range (vocabulary {self.vocab})")
        if self.length >= self.n_ctx:
            raise GptFpgaError(f"position {self.length} is beyond the model's context of {self.n_ctx}")
        self.last_stats = []
        self.write_residual(self.embed(token, self.length))
        self.state.flush()
        self.device.write_reg(REG("POSITION").offset, self.length)
        for layer in range(self.n_layer):
            self.run(rm.OP_LAYER, layer)
            if observe is not None:
                observe(layer, self.read_residual())
        self.run(rm.OP_HEAD)
        self.length += 1
        return self.read_logits()

    def forward_int(self, ids) -> np.ndarray:  # [n] -> [n, vocab] int64 holding the int32 logits
        return np.stack([self.step(int(t)) for t in ids])

    def forward(self, ids) -> np.ndarray:
        return (self.forward_int(ids) * 2.0 ** -nx.LOGIT_FRAC).astype(np.float32)

    def close(self):
        self.device.close()
