"""The RTL device (host/rtl_device.py + host/rtl_harness.cpp): the engine in Verilator behind the
driver's device protocol, with its DDR model.

A small host (:class:`Host`, the steps of sim/tb/engine.py::token_step done through the protocol:
allocate, place the image and the descriptor table, write registers, wait for the interrupt) runs
whole LAYER and HEAD commands and compares the residual, the K/V rows and the logits with
sim/fixed_model.py by equality. Images are random-weight checkpoints quantized by the real quantizer
(like tests/test_engine.py), and the bundled gpt2-kjv model. The engines are the default-size ones
that ``--backend rtl`` uses (they build as fast as small ones): the first run of this file builds the
int8 and the int4 engine, about half a minute each on two cores, into build/rtl/; later runs load
them at once.
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt_fpga.contract import descriptors as dsc
from gpt_fpga.contract import numerics as nx
from gpt_fpga.contract import registers as rm
from gpt_fpga.contract.image import data_start, read_image
from gpt_fpga.sim.fixed_model import FixedModel
from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint
from gpt_fpga.sim.tb.runner import simulator_cases

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "build" / "sim" / "rtl_device" / "images"
REG = rm.register
ENGINE_KW: dict = {}  # the Engine's defaults (the contract's maxima), as --backend rtl builds it
GROUP = 32  # the int4 images here use group 32; tests/test_rtl_backend.py runs the default (128)
# (family, weights, group, config kwargs, prompt ids)
CASES = {
    # vocab 512 makes HEAD weight-bound (512 rows of 9 beats), for the bandwidth test
    "gpt2-int8": ("gpt2", "int8", 32, dict(vocab=512, d=64, heads=2, layers=2, n_ctx=16, d_ff=128), [5, 300, 17]),
    "neo3h-int4": ("gpt_neo", "int4", GROUP, dict(vocab=75, d=48, heads=3, layers=2, n_ctx=16, d_ff=80,
                                                attention_types=[[["global", "local"], 1]], window_size=2),
                   [3, 17, 42, 5]),
}

pytestmark = pytest.mark.sim
VERILATOR = simulator_cases(["verilator"])  # the missing_tool mark when verilator is not installed


def build_image(name: str) -> Path:
    family, weights, group, kw, _ = CASES[name]
    IMAGES.mkdir(parents=True, exist_ok=True)
    img = IMAGES / f"{name}.img"
    if not img.is_file():
        from gpt_fpga.quantize.quantizer import quantize_checkpoint

        cfg = make_config(family, **kw)
        model_dir = write_checkpoint(IMAGES / name, cfg, random_tensors(cfg, seed=5))
        quantize_checkpoint(model_dir, img, weights=weights, group=group, calib_tokens=32, progress=False)
    return img


class Host:
    """What the driver does, through the device protocol only: place the image's data region and the
    state buffer (descriptor table, eps table, residual, logits, KV cache), start commands, wait."""

    def __init__(self, dev, image_path: Path):
        self.dev = dev
        self.image = read_image(image_path)
        self.model = FixedModel(self.image)
        self.cfg = self.model.cfg
        h = self.image.header
        self.bus_bytes = self.image.hw.bus_bytes
        self.state = dsc.plan_state(h, self.bus_bytes)
        with open(image_path, "rb") as f:
            f.seek(data_start(self.image.header_length))
            weights = f.read()
        self.wbuf = dev.allocate(len(weights))
        self.wbuf[:] = np.frombuffer(weights, np.uint8)
        self.wbuf.flush()
        self.sbuf = dev.allocate(self.state.total)
        self.place = dsc.placement(h, self.wbuf.device_address, self.sbuf.device_address, self.state)
        self.desc_addr = self.sbuf.device_address + self.state.desc
        self.load()

    def load(self, table: bytes | None = None):
        table = dsc.build_table(self.image.header, self.place) if table is None else table
        self.poke(self.desc_addr, table)
        self.poke(self.place.eps_addr, dsc.eps_table_bytes(self.image.header["ln_eps_table"]))

    def _view(self, addr: int, n: int) -> np.ndarray:
        off = addr - self.sbuf.device_address
        assert 0 <= off and off + n <= len(self.sbuf), hex(addr)
        return self.sbuf[off:off + n]

    def poke(self, addr: int, data: bytes):
        self._view(addr, len(data))[:] = np.frombuffer(data, np.uint8)
        self.sbuf.flush()

    def peek(self, addr: int, n: int) -> bytes:
        self.sbuf.invalidate()
        return self._view(addr, n).tobytes()

    def write_resid(self, x):
        self.poke(self.place.resid_addr, np.asarray(x, dtype="<i4").tobytes())

    def read_resid(self) -> np.ndarray:
        return np.frombuffer(self.peek(self.place.resid_addr, 4 * self.cfg.d_model), "<i4").astype(np.int64)

    def read_logits(self) -> np.ndarray:
        return np.frombuffer(self.peek(self.place.logits_addr, 4 * self.cfg.vocab_size), "<i4").astype(np.int64)

    def kv_row(self, which: str, layer: int, head: int, pos: int) -> np.ndarray:
        base = (self.place.k_cache if which == "k" else self.place.v_cache)[layer]
        off = dsc.kv_row_offset(head, pos, self.cfg.n_ctx, self.cfg.head_dim, self.bus_bytes)
        return np.frombuffer(self.peek(base + off, self.cfg.head_dim), np.int8).astype(np.int64)

    def reg(self, name: str) -> int:
        return self.dev.read_reg(REG(name).offset)

    def start(self, op: int, layer: int, position: int, desc_addr: int | None = None):
        w = self.dev.write_reg
        w(REG("DESC_ADDR").offset, self.desc_addr if desc_addr is None else desc_addr)
        w(REG("POSITION").offset, position)
        w(REG("COMMAND").offset, REG("COMMAND").pack(op=op, layer=layer))
        w(REG("IRQ_ENABLE").offset, REG("IRQ_ENABLE").pack(done=1))
        w(REG("CONTROL").offset, REG("CONTROL").pack(start=1))

    def run(self, op: int, layer: int, position: int, timeout_s: float = 0.1, desc_addr: int | None = None) -> dict:
        """One command: start, wait for the interrupt, read the result registers, clear the interrupt."""
        self.start(op, layer, position, desc_addr)
        assert self.dev.wait_interrupt(timeout_s), \
            f"op {op} layer {layer} pos {position}: no interrupt; STATUS={REG('STATUS').unpack(self.reg('STATUS'))}"
        out = {name: self.reg(name) for name in ("STATUS", "ERROR", "STEP", "CYCLES", "BEATS_READ", "BEATS_WRITTEN")}
        self.dev.write_reg(REG("IRQ_STATUS").offset, REG("IRQ_STATUS").pack(done=1))
        assert not self.dev.wait_interrupt(0), "interrupt still high after IRQ_STATUS was cleared"
        out["status"] = REG("STATUS").unpack(out["STATUS"])
        out["error"] = {k: v for k, v in REG("ERROR").unpack(out["ERROR"]).items() if v}
        out["step"] = rm.STEPS[REG("STEP").unpack(out["STEP"])["step"]]
        return out

    def token_step(self, tok: int, pos: int) -> list[dict]:
        """Embed on the host, run every LAYER and the HEAD, each equal to the fixed model; returns the
        commands' result registers."""
        model, cfg = self.model, self.cfg
        x = model.embed([tok], pos)
        self.write_resid(x[0])
        results = []
        for layer in range(cfg.n_layer):
            r = self.run(rm.OP_LAYER, layer, pos)
            expect_ok(r, f"LAYER {layer} at {pos}")
            x = model.block(x, layer, pos)
            got = self.read_resid()
            bad = np.nonzero(got != x[0])[0]
            assert not len(bad), (f"LAYER {layer} pos {pos}: residual differs at {len(bad)} of {cfg.d_model}, "
                                  f"first [{bad[0]}] rtl {got[bad[0]]} model {x[0, bad[0]]}")
            for h in range(cfg.n_head):
                for which, cache in (("k", model.k_cache), ("v", model.v_cache)):
                    assert np.array_equal(self.kv_row(which, layer, h, pos), cache[layer, h, pos].astype(np.int64)), \
                        f"LAYER {layer} pos {pos}: {which} row of head {h} differs"
            results.append(r)
        r = self.run(rm.OP_HEAD, 0, pos)
        expect_ok(r, f"HEAD at {pos}")
        model.length = pos + 1
        want = model.head(model.lnf(x, model.eps_table), nx.RESID_BITS)[0]
        got = self.read_logits()
        bad = np.nonzero(got != want)[0]
        assert not len(bad), f"HEAD pos {pos}: logits differ at {len(bad)} of {cfg.vocab_size}, first [{bad[0]}]"
        return results + [r]


def expect_ok(result: dict, what: str):
    assert result["status"]["done"] and not result["status"]["busy"], f"{what}: {result}"
    assert not result["status"]["error"] and not result["error"], f"{what}: ended with errors {result}"


# ---------------------------------------------------------------------------------------------
# fixtures: one device per weight format for the module (the builds are cached on disk anyway)

def _device(weights: str, **kw):
    from gpt_fpga.host.rtl_device import RtlDevice

    return RtlDevice(weights=weights, group=GROUP, **ENGINE_KW, **kw)


@pytest.fixture(scope="module")
def dev8():
    d = _device("int8")
    yield d
    d.close()


@pytest.fixture(scope="module")
def dev4():
    d = _device("int4")
    yield d
    d.close()


@pytest.fixture
def dev(dev8):
    """The int8 device, reset, with the DDR model at its defaults."""
    dev8.configure_ddr(read_latency=85, bytes_per_cycle=8, write_latency=16)
    dev8.reset()
    return dev8


# ---------------------------------------------------------------------------------------------
# the tests

@pytest.mark.parametrize("sim", VERILATOR)
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_identity_registers(sim, weights, request):
    """ID, VERSION, HW_CONFIG and the maxima read back the engine's identity()."""
    from gpt_fpga.hw.engine import Engine

    dev = request.getfixturevalue("dev8" if weights == "int8" else "dev4")
    want = Engine(weights=weights, group=GROUP, **ENGINE_KW).identity()
    got = {name: dev.read_reg(REG(name).offset) for name in want}
    assert got == want


@pytest.mark.parametrize("sim", VERILATOR)
@pytest.mark.parametrize("case", list(CASES))
def test_tokens_equal_fixed_model(sim, case, request):
    """Buffers written with NumPy are what the engine reads, and what it writes (residual, K/V rows,
    logits) appears in NumPy, equal to the fixed model, for every prompt token."""
    dev = request.getfixturevalue("dev8" if CASES[case][1] == "int8" else "dev4")
    dev.reset()
    host = Host(dev, build_image(case))
    for pos, tok in enumerate(CASES[case][4]):
        host.token_step(tok, pos)
    s = dev.stats()
    assert s["protocol_errors"] == 0 and s["read_error_beats"] == 0 and s["write_error_bursts"] == 0, s


@pytest.mark.parametrize("sim", VERILATOR)
def test_buffers(sim, dev):
    """allocate: 4 KiB-aligned, disjoint, zeroed uint8 arrays whose views keep their device address."""
    a, b = dev.allocate(100), dev.allocate(5000)
    assert a.dtype == np.uint8 and a.shape == (100,) and not a.any() and not b.any()
    assert a.device_address % 4096 == 0 and b.device_address % 4096 == 0
    assert b.device_address >= a.device_address + 4096
    assert b[8:].device_address == b.device_address + 8
    assert b.view(np.uint32)[3:].device_address == b.device_address + 12
    assert b.physical_address == b.device_address
    a.flush(), a.invalidate()
    with pytest.raises(ValueError):
        (a + 1).device_address  # a computed array is not device memory
    from gpt_fpga.contract.errors import GptFpgaError

    with pytest.raises(GptFpgaError, match="ddr_bytes"):
        dev.allocate(dev.ddr_bytes)


@pytest.mark.parametrize("sim", VERILATOR)
def test_timeout_returns_false(sim, dev):
    """No command started: wait_interrupt times out (False) without hanging, and a long timeout of an
    idle engine costs no simulation time; a running command's timeout is simulated and ends it."""
    t = time.perf_counter()
    assert dev.wait_interrupt(0.001) is False
    assert dev.wait_interrupt(60.0) is False  # 6e9 cycles: skipped, the engine is idle
    assert time.perf_counter() - t < 5
    host = Host(dev, build_image("gpt2-int8"))
    host.write_resid(host.model.embed([1], 0)[0])
    host.start(rm.OP_LAYER, 0, 0)
    before = dev.stats()["cycles"]
    assert dev.wait_interrupt(200e-9) is False  # 20 cycles: the command is still running
    assert 20 <= dev.stats()["cycles"] - before < 40
    assert REG("STATUS").unpack(host.reg("STATUS"))["busy"]
    assert dev.wait_interrupt(0.1) is True
    r = {k: v for k, v in REG("ERROR").unpack(host.reg("ERROR")).items() if v}
    assert not r, r
    dev.write_reg(REG("IRQ_STATUS").offset, 1)


@pytest.mark.parametrize("sim", VERILATOR)
def test_address_outside_ddr_is_axi_read_error(sim, dev):
    """A descriptor pointing outside DDR (above it, and address 0 below it): the read answers DECERR,
    the command ends with ERROR.axi_read and the interrupt; nothing crashes and the next command is
    exact. Likewise a logits address outside DDR gives ERROR.axi_write."""
    host = Host(dev, build_image("gpt2-int8"))
    tok = CASES["gpt2-int8"][4][0]
    for bad_addr in (dev.ddr_base + dev.ddr_bytes + 0x1000, 0):
        table = bytearray(dsc.build_table(host.image.header, host.place))
        off, _ = dsc.field_bits("layer", "qkv_addr")
        struct.pack_into("<I", table, dsc.record_offset("layer", 0) + off // 8, bad_addr)
        host.load(bytes(table))
        host.write_resid(host.model.embed([tok], 0)[0])
        r = host.run(rm.OP_LAYER, 0, 0)
        assert r["status"]["error"] and r["error"] == {"axi_read": 1}, r
        assert r["step"] == "qkv", r
    assert dev.stats()["read_error_beats"] > 0
    # the descriptor table itself outside DDR
    r = host.run(rm.OP_LAYER, 0, 0, desc_addr=dev.ddr_base + dev.ddr_bytes)
    assert r["error"].get("axi_read"), r
    # a write outside DDR: HEAD's logits (nothing reads them)
    table = bytearray(dsc.build_table(host.image.header, host.place))
    off, _ = dsc.field_bits("model", "logits_addr")
    struct.pack_into("<I", table, off // 8, 0x0000_1000)
    host.load(bytes(table))
    r = host.run(rm.OP_HEAD, 0, 0)
    assert r["status"]["error"] and r["error"] == {"axi_write": 1}, r
    assert dev.stats()["write_error_bursts"] > 0
    host.load()
    host.model.reset()
    host.token_step(tok, 0)


@pytest.mark.parametrize("sim", VERILATOR)
def test_ddr_knobs(sim, dev):
    """The DDR model's knobs change a weight-bound command (HEAD: 512 rows of 9 beats) the way they
    should, and the logits stay exact:

    * bandwidth: at 4 bytes/cycle every read beat costs one more cycle (about double the cycles), at
      2.5 bytes/cycle 2.2 more;
    * latency: up to ~105 cycles the read DMA's 128 beats in flight hide it (only the few dependent
      reads of a command wait longer); at 300 the stream is latency-bound, at most 128 beats per
      300 cycles.
    """
    from gpt_fpga.hw.axi import MAX_BURST_BEATS
    from gpt_fpga.hw.axi_read import DEFAULT_MAX_OUTSTANDING

    host = Host(dev, build_image("gpt2-int8"))
    host.write_resid(host.model.embed([7], 0)[0])

    def head(**ddr):
        dev.configure_ddr(**{"read_latency": 85, "bytes_per_cycle": 8, **ddr})
        r = host.run(rm.OP_HEAD, 0, 0)
        expect_ok(r, f"HEAD with {ddr}")
        assert np.array_equal(host.read_logits(), logits), f"HEAD with {ddr}: logits differ"
        return r["CYCLES"]

    dev.configure_ddr(read_latency=85, bytes_per_cycle=8)
    r = host.run(rm.OP_HEAD, 0, 0)
    logits = host.read_logits()
    base, beats = r["CYCLES"], r["BEATS_READ"]
    assert beats > 0.85 * base, (base, beats)  # weight-bound: about one beat per cycle

    half = head(bytes_per_cycle=4)
    assert 1.75 < half / base < 2.05, (base, half)
    assert abs((half - base) - beats) < 0.03 * beats, (base, half, beats)
    frac = head(bytes_per_cycle=2.5)
    assert abs((frac - base) - beats * (8 / 2.5 - 1)) < 0.03 * beats, (base, frac, beats)

    hidden = head(read_latency=105)
    assert 0 < hidden - base < 0.03 * base, (base, hidden)
    assert head(read_latency=1) < base
    window = MAX_BURST_BEATS * DEFAULT_MAX_OUTSTANDING  # beats the read DMA keeps in flight
    slow = head(read_latency=300)
    assert slow > beats * 300 / window, (slow, beats)
    s = dev.stats()
    assert s["stall_cycles"] > 0 and s["protocol_errors"] == 0, s


@pytest.mark.parametrize("sim", VERILATOR)
def test_reset_mid_command(sim, dev):
    """reset() in the middle of a LAYER: the DDR model drops what was in flight, the engine is idle,
    and the next token is exact."""
    host = Host(dev, build_image("gpt2-int8"))
    host.write_resid(host.model.embed([9], 0)[0])
    host.start(rm.OP_LAYER, 0, 0)
    dev.run(500)
    assert REG("STATUS").unpack(host.reg("STATUS"))["busy"]
    dev.reset()
    assert REG("STATUS").unpack(host.reg("STATUS")) == {"busy": 0, "done": 0, "error": 0}
    assert not dev.interrupt
    host.token_step(9, 0)


@pytest.mark.parametrize("sim", VERILATOR)
def test_closed_device_refuses(sim):
    d = _device("int8")
    buf = d.allocate(64)
    buf[:] = 7
    d.close()
    assert buf.sum() == 7 * 64  # buffers outlive the device
    with pytest.raises(RuntimeError, match="closed"):
        d.read_reg(0)
    d.close()  # twice is fine


def test_import_needs_no_hw_tools():
    """Importing host/rtl_device.py imports neither Amaranth nor Verilator (the board has neither)."""
    import subprocess

    code = ("import sys; import gpt_fpga.host.rtl_device; "
            "bad = [m for m in ('amaranth', 'verilator', 'cocotb') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_hw_extra_names_the_install(monkeypatch, tmp_path):
    """Without amaranth (or verilator) and nothing cached, the error names what to install."""
    from gpt_fpga.host import rtl_device
    from gpt_fpga.contract.errors import GptFpgaError

    monkeypatch.setenv("GPT_FPGA_RTL_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "amaranth", None)  # import amaranth -> ImportError
    with pytest.raises(GptFpgaError, match=r"amaranth.*pip install -e '\.\[hw\]'"):
        rtl_device.RtlDevice(max_d=64)


# ---------------------------------------------------------------------------------------------
# the default-size engine (what --backend rtl builds), on the bundled model

@pytest.mark.parametrize("sim", VERILATOR)
def test_bundled_model_token(sim, dev):
    """A token of the bundled gpt2-kjv model (int8: 4 layers, d 256, vocab 4096) equals the fixed model;
    prints the simulation speed."""
    from gpt_fpga.quantize.quantizer import quantize_checkpoint

    img = IMAGES / "gpt2-kjv-int8.img"
    if not img.is_file():
        IMAGES.mkdir(parents=True, exist_ok=True)
        quantize_checkpoint(REPO / "models" / "gpt2-kjv", img, weights="int8", calib_tokens=64, progress=False)
    host = Host(dev, img)
    dev.clear_stats()
    t = time.perf_counter()
    results = host.token_step(5, 0)
    wall = time.perf_counter() - t
    s = dev.stats()
    cycles = sum(r["CYCLES"] for r in results)
    print(f"\none token of gpt2-kjv int8 on the RTL device: {cycles} engine cycles, {wall:.2f} s, "
          f"{s['cycles_per_s'] / 1e6:.2f} M simulated cycles/s")
    assert s["protocol_errors"] == 0, s
