"""The PYNQ device (host/pynq_device.py), --backend pynq and board-check, off the board.

One set of tests, two ways to run it:

* **With pynq installed** (``.ci/board-python.sh``: the board's Python 3.10, pynq 4.0.0, numpy 1.26) the
  real pynq module runs: its ``DefaultIP`` (our ``EngineIP`` subclass binds to the engine's VLNV), its
  ``MMIO`` on a register device (the REGISTER_RW path, as pynq's own MockRegisterDevice uses), its
  ``allocate`` and ``PynqBuffer``, and pynq's own ``MockAllocateDevice`` checks the flush and invalidate
  calls. Only what cannot run off a board is replaced: ``pynq.Overlay`` (no bitstream loads here),
  ``pynq.Clocks`` and the active device. The interrupt is pynq's own: ``pynq.interrupt.Interrupt`` and
  its ``_InterruptController`` (the axi_intc driver) read and write an AXI interrupt controller through
  the board's registers, and that controller is pynq's own ``MockInterruptController`` (its
  tests/test_interrupt.py), behind pynq's ``MockUioController`` in place of the kernel's UIO device:
  the engine's level interrupt drives the controller's input 0, as the overlay wires it
  (engine/interrupt -> axi_intc intr[0] -> irq -> IRQ_F2P[0]); the interrupt dictionaries are those
  pynqmetadata's InterruptPinsView / InterruptControllersView make of such a block design.
* **Without pynq** (the main venv, Python 3.11) a stand-in module is put in ``sys.modules["pynq"]``. It
  mimics, after pynq 4.0.0's source, the API surface PynqDevice uses: ``Device`` (``devices``,
  ``active_device``), ``Overlay``/``ip_dict``, ``DefaultIP`` with its ``MMIO``, ``allocate`` and
  ``PynqBuffer`` (flush and invalidate call the device with bo, offset and length, and ``freebuffer``),
  ``Interrupt`` (``wait`` is a coroutine; a FakeInterrupt that watches the board's interrupt line),
  ``Clocks.fclk0_mhz``, and a MockAllocateDevice equivalent.

Behind either stands :class:`FakeBoard`: the engine's registers (decoded by offset with
contract/registers.py: an access anywhere else fails the test) and a command-level model of the
engine, which computes LAYER and HEAD with the fixed model from what is in its DDR. DDR is separate from
the host's view of a buffer, like the HP ports without cache coherency: flush copies host -> DDR,
invalidate DDR -> host, so a missing flush or invalidate gives wrong numbers, not just a log entry.

These tests import nothing from conftest.py: the 3.10 run uses ``--import-mode=importlib`` (pynq installs a
top-level ``tests`` package), where ``from conftest import`` does not resolve.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import io
import sys
import time
import types
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest

from gpt_fpga.host import board_check as bc
from gpt_fpga.host.driver import Driver, EngineError
from gpt_fpga.host.pynq_device import (ENGINE_VLNV, OVERLAY_ENV, BoardError, CmaError, NotOnBoardError, OverlayError,
                                       PynqDevice, overlay_path)
from gpt_fpga.quantize.quantizer import quantize_checkpoint
from gpt_fpga.contract import descriptors as dsc
from gpt_fpga.contract import numerics as nx
from gpt_fpga.contract import registers as rm
from gpt_fpga.contract.image import FORMAT_VERSION, read_image
from gpt_fpga.sim.fixed_model import FixedModel
from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint

REG = rm.register
REAL_PYNQ = importlib.util.find_spec("pynq") is not None
BASE = 0x43C0_0000  # the engine's GP0 address in the fake overlay
INTC_BASE = 0x4180_0000  # the axi_intc's (hw/bitstream.py INTC_BASE)
INTC_SPAN = 0x20  # its registers ISR .. MER
FABRIC_IRQ = 61  # IRQ_F2P[0] on the Zynq-7000's GIC (pynq's interrupt_controllers "raw_irq")
DDR_BASE = 0x1800_0000
MHZ = 100.0


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from gpt_fpga.host.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # board-check ends with exit 1 when a check failed
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpt-fpga: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# the stand-in pynq (used only where pynq is not installed)

def make_standin() -> types.ModuleType:
    m = types.ModuleType("pynq")
    m.__version__ = "stand-in"

    class DeviceMeta(type):
        @property
        def devices(cls):
            if not cls._devices:
                warnings.warn("No devices found, is the XRT environment sourced?", UserWarning)
            return cls._devices

        @property
        def active_device(cls):
            if getattr(cls, "_active_device", None) is not None:
                return cls._active_device
            if not cls._devices:
                raise RuntimeError("No Devices Found")
            return cls._devices[0]

    class Device(metaclass=DeviceMeta):
        _devices: list = []
        capabilities: dict = {}

        def __init__(self, tag, warn=False):
            if type(tag) is not str:
                raise ValueError("Argument 'tag' must be a string")
            self.tag = tag

        def has_capability(self, cap):
            return self.capabilities.get(cap, False)

    class MMIO:  # the REGISTER_RW path: device.read_registers / write_registers with bytes
        def __init__(self, base_addr, length=4, device=None):
            self.device = device if device is not None else Device.active_device
            if base_addr < 0 or length < 0:
                raise ValueError("Base address or length cannot be negative.")
            if not self.device.has_capability("REGISTER_RW"):
                raise ValueError("Device does not have capabilities for MMIO")
            self.base_addr, self.length = base_addr, length

        def read(self, offset=0, length=4):
            if offset % 4:
                raise MemoryError("Unaligned read: offset must be multiple of 4.")
            return int.from_bytes(self.device.read_registers(self.base_addr + offset, 4), "little")

        def write(self, offset, data):
            if offset % 4:
                raise MemoryError("Unaligned write: offset must be multiple of 4.")
            self.device.write_registers(self.base_addr + offset, int(data).to_bytes(4, "little"))

    class Interrupt:
        def __init__(self, pinname):
            raise ValueError(f"No Pin of name {pinname} found")

    class DefaultIP:
        def __init__(self, description):
            self.device = description["device"] if "device" in description else Device.active_device
            self.mmio = MMIO(description["phys_addr"], description["addr_range"], device=self.device)
            self._interrupts = description.get("interrupts", {})
            for name, details in self._interrupts.items():
                try:
                    setattr(self, name, m.Interrupt(details["fullpath"]))
                except ValueError as e:
                    warnings.warn(f"Interrupt {name} not created: {e}")
                    setattr(self, name, None)

        def read(self, offset=0):
            return self.mmio.read(offset)

        def write(self, offset, value):
            self.mmio.write(offset, value)

    class PynqBuffer(np.ndarray):
        device = None  # numpy 2's ndarray.device is read-only (pynq's own PynqBuffer needs numpy<2)

        def __new__(cls, *args, device=None, device_address=0, bo=0, coherent=False, **kwargs):
            self = super().__new__(cls, *args, **kwargs)
            self.device_address, self.coherent, self.bo, self.device = device_address, coherent, bo, device
            self.offset, self.freed = 0, False
            return self

        def __array_finalize__(self, obj):
            if isinstance(obj, PynqBuffer) and obj.coherent is not None:
                offset = self.virtual_address - obj.virtual_address
                self.coherent, self.device, self.bo = obj.coherent, obj.device, obj.bo
                self.device_address, self.offset = obj.device_address + offset, obj.offset + offset
            else:
                self.device_address = self.coherent = None

        @property
        def virtual_address(self):
            return self.__array_interface__["data"][0]

        def freebuffer(self):
            if hasattr(self, "memory") and getattr(self, "pointer", 0):
                if self.return_to:
                    self.return_to.return_pointer(self.pointer)
                self.pointer = 0

        def flush(self):
            if not self.coherent:
                self.device.flush(self.bo, self.offset, self.virtual_address, self.nbytes)

        def invalidate(self):
            if not self.coherent:
                self.device.invalidate(self.bo, self.offset, self.virtual_address, self.nbytes)

    def allocate(shape, dtype="u4", target=None, **kwargs):
        return (target or Device.active_device).allocate(shape, dtype, **kwargs)

    class Overlay:
        def __init__(self, bitfile_name, *a, **kw):
            raise RuntimeError("No Devices Found")

    class Clocks:
        fclk0_mhz = property(lambda self: (_ for _ in ()).throw(RuntimeError("No Devices Found")))

    class MockAllocateDevice(Device):  # pynq/tests/mock_devices.py's, same behaviour
        def __init__(self, tag):
            super().__init__(tag)
            self.allocates, self.flushes, self.invalidates = (collections.deque() for _ in range(3))
            self._allocated = []

        def allocate(self, shape, dtype):
            bo, coherent, address = self.allocates.popleft()
            buf = PynqBuffer(shape, dtype, device=self, bo=bo, coherent=coherent, device_address=address)
            self._allocated.append(weakref.ref(buf))
            return buf

        def flush(self, bo, offset, vaddr, length):
            assert self.flushes.popleft() == (bo, offset, length)

        def invalidate(self, bo, offset, vaddr, length):
            assert self.invalidates.popleft() == (bo, offset, length)

        def check_memops(self, allocates=(), flushes=(), invalidates=()):
            self.allocates, self.flushes, self.invalidates = (collections.deque(x) for x in
                                                              (allocates, flushes, invalidates))
            return self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            assert not self.allocates and not self.flushes and not self.invalidates

    m.Device, m.MMIO, m.Interrupt, m.DefaultIP, m.allocate = Device, MMIO, Interrupt, DefaultIP, allocate
    m.Overlay, m.Clocks = Overlay, Clocks()
    m.buffer = types.SimpleNamespace(PynqBuffer=PynqBuffer, allocate=allocate)
    m.overlay = m  # DefaultIP looks Interrupt up here, as pynq.overlay does
    m.MockAllocateDevice = MockAllocateDevice
    return m


PYNQ_TESTS = "pynq_own_tests"  # pynq's installed `tests` package, under a name that cannot shadow ours


def pynq_test_module(pynq, name: str) -> types.ModuleType:
    """A module of pynq's own tests package (mock_devices, test_interrupt), loaded from its folder under
    PYNQ_TESTS so that its relative imports work and our tests/ is not shadowed."""
    folder = Path(pynq.__file__).resolve().parents[1] / "tests"
    if PYNQ_TESTS not in sys.modules:
        package = types.ModuleType(PYNQ_TESTS)
        package.__path__ = [str(folder)]
        sys.modules[PYNQ_TESTS] = package
    full = f"{PYNQ_TESTS}.{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its pytest.mark.asyncio is not a mark of ours
            spec.loader.exec_module(mod)
    return sys.modules[full]


def pynq_mock_devices(pynq):
    """pynq's own tests/mock_devices.py, or the stand-in's equivalent."""
    if not REAL_PYNQ:
        return types.SimpleNamespace(MockAllocateDevice=pynq.MockAllocateDevice)
    return pynq_test_module(pynq, "mock_devices")


@pytest.fixture
def pynq(monkeypatch):
    if REAL_PYNQ:
        import pynq as real

        return real
    standin = make_standin()
    monkeypatch.setitem(sys.modules, "pynq", standin)
    return standin


# ---------------------------------------------------------------------------------------------------
# the fake board: registers, a command-level engine, non-coherent DDR

def identity_regs(weights="int8", bus_bits=64, group=0, ports=1, **changes) -> dict:
    regs = {"ID": rm.ENGINE_MAGIC,
            "VERSION": REG("VERSION").pack(contract=nx.CONTRACT_VERSION, image_format=FORMAT_VERSION,
                                           regmap=rm.REGMAP_VERSION),
            "HW_CONFIG": REG("HW_CONFIG").pack(bus_bits=bus_bits, weights=rm.WEIGHT_CODES[weights], group=group,
                                               ports=ports),
            "MAX_D_IN": nx.MAX_D_IN, "MAX_CONTEXT": nx.MAX_CONTEXT, "MAX_HEAD_DIM": nx.MAX_HEAD_DIM}
    regs.update(changes)
    return regs


class Bo:
    def __init__(self, address, nbytes):
        self.address, self.nbytes = address, nbytes
        self.host = np.zeros(nbytes, np.uint8)  # what the CPU sees (its cache)
        self.ddr = np.zeros(nbytes, np.uint8)  # what the engine sees


def board_class(pynq):
    class FakeBoard(pynq.Device):
        capabilities = {"REGISTER_RW": True}

        def __init__(self, ident: dict, behaviour="exact", cma_bytes=1 << 30, irq="wired"):
            super().__init__("fake_board")
            self.regs = {REG(k).offset: v for k, v in ident.items()}
            self.behaviour, self.cma_bytes, self.irq = behaviour, cma_bytes, irq
            self.bos: list[Bo] = []
            self.next_addr, self.live = DDR_BASE, 0
            self.log: list[tuple] = []
            self.freed: list[int] = []
            self.image = self.model = None
            self.stats: list[dict] = []
            self.drop_flush = False
            self.alloc_error = "BO allocation failed: Cannot allocate memory"  # pynq 3/4 (XRT) when CMA runs out
            self.intc = None  # with the real pynq: its MockInterruptController at INTC_BASE
            self.line = False  # the engine's interrupt output as the controller last saw it

        # -- registers (pynq's MMIO calls these with bytes)
        def _name(self, address, length):
            assert length == 4, length
            offset = address - BASE
            names = [r.name for r in rm.REGISTERS if r.offset == offset]
            assert names, f"access at 0x{address:x}: offset 0x{offset:x} is not in the register map"
            return names[0]

        def read_registers(self, address, length):
            if self.intc is not None and INTC_BASE <= address < INTC_BASE + INTC_SPAN:
                return self.intc.read(address - INTC_BASE, length)
            name = self._name(address, length)
            return int(self.regs.get(REG(name).offset, 0)).to_bytes(4, "little")

        def write_registers(self, address, data):
            if self.intc is not None and INTC_BASE <= address < INTC_BASE + INTC_SPAN:
                offset, value = address - INTC_BASE, int.from_bytes(data, "little")
                if offset == 0x0C and value:  # IAR: pynq's controller acknowledges an interrupt it handled
                    self.log.append(("irq", value))
                with contextlib.redirect_stdout(io.StringIO()):  # pynq's mocks print every change
                    return self.intc.write(offset, bytes(data))
            try:
                self._write_engine(address, data)
            finally:
                self.drive_irq()

        def drive_irq(self):
            """The engine's interrupt into the controller's input 0 (only the "wired" board connects it)."""
            line = self.irq == "wired" and self.irq_line()
            if self.intc is not None and line != self.line:
                self.line = line
                with contextlib.redirect_stdout(io.StringIO()):  # pynq's mocks print every change
                    self.intc.set_line(0, line)

        def _write_engine(self, address, data):
            name = self._name(address, len(data))
            value = int.from_bytes(data, "little")
            self.log.append(("write", name, value))
            r = REG(name)
            if r.access == "ro":
                return
            if name == "IRQ_STATUS":
                self.regs[r.offset] = self.regs.get(r.offset, 0) & ~value
            elif name == "CONTROL":
                f = r.unpack(value)
                if f["abort"]:
                    self._end(error=False)
                elif f["start"] and not self.status()["busy"]:
                    self._start()
            else:
                self.regs[r.offset] = value

        def reg(self, name):
            return self.regs.get(REG(name).offset, 0)

        def status(self):
            return REG("STATUS").unpack(self.reg("STATUS"))

        def irq_line(self) -> bool:
            return bool(self.reg("IRQ_STATUS") & self.reg("IRQ_ENABLE") & 1)

        # -- memory (pynq.allocate(shape, dtype, cacheable=...) calls this)
        def allocate(self, shape, dtype, cacheable=False, **kw):
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            self.log.append(("allocate", nbytes, cacheable))
            if self.live + nbytes > self.cma_bytes:
                raise RuntimeError(self.alloc_error)
            bo = Bo(self.next_addr, nbytes)
            self.next_addr += -(-nbytes // 4096) * 4096
            self.live += nbytes
            self.bos.append(bo)
            buf = pynq.buffer.PynqBuffer(shape, dtype, device=self, bo=bo, coherent=not cacheable,
                                         device_address=bo.address, buffer=bo.host)
            buf.memory, buf.pointer, buf.return_to, buf.freed = self, bo, self, True  # pynq's cached-buffer path
            return buf

        def return_pointer(self, bo):
            self.freed.append(bo.address)
            self.live -= bo.nbytes

        def flush(self, bo, offset, vaddr, length):
            self.log.append(("flush", bo.address, offset, length))
            if not self.drop_flush:
                bo.ddr[offset:offset + length] = bo.host[offset:offset + length]

        def invalidate(self, bo, offset, vaddr, length):
            self.log.append(("invalidate", bo.address, offset, length))
            bo.host[offset:offset + length] = bo.ddr[offset:offset + length]

        def ddr(self, address):
            for bo in self.bos:
                if bo.address <= address < bo.address + bo.nbytes:
                    return bo.ddr, address - bo.address
            raise AssertionError(f"the engine was sent to 0x{address:x}, outside every buffer")

        # -- the engine, one command at a time
        def use_image(self, path):
            self.image = read_image(path)
            self.model = FixedModel(self.image)

        def _set(self, name, **fields):
            self.regs[REG(name).offset] = REG(name).pack(**fields)

        def _end(self, error: bool, bits: int = 0):
            self._set("STATUS", done=1, error=int(error))
            self.regs[REG("ERROR").offset] = bits
            self.regs[REG("IRQ_STATUS").offset] = 1

        def _start(self):
            self.log.append(("start",))
            self.regs[REG("ERROR").offset] = 0
            if self.behaviour == "hang":
                self._set("STATUS", busy=1)
                return
            cmd = REG("COMMAND").unpack(self.reg("COMMAND"))
            h = self.image.header
            hw = self.image.hw
            lay = dsc.plan_state(h, hw.bus_bytes)
            mem, at = self.ddr(self.reg("DESC_ADDR"))
            if int.from_bytes(mem[at:at + 4].tobytes(), "little") != dsc.DESC_MAGIC:  # the table never reached DDR
                return self._end(True, REG("ERROR").pack(descriptor=1))
            base = at - lay.desc
            d, v = h["config"]["d_model"], h["config"]["vocab_size"]
            x = np.frombuffer(mem[base + lay.resid:base + lay.resid + 4 * d].tobytes(), "<i4").astype(np.int64)
            size = {s["name"]: s["size"] for s in h["sections"]}
            if cmd["op"] == rm.OP_HEAD:
                out = self.model.head(self.model.lnf(x[None], self.model.eps_table), nx.RESID_BITS)[0]
                where, read = lay.logits, size["lm_head"] + size["lnf"] + 4 * d
            else:
                layer = cmd["layer"]
                out = self.model.block(x[None], layer, self.reg("POSITION"))[0]
                where, read = lay.resid, sum(n for k, n in size.items() if k.startswith(f"L{layer}.")) + 4 * d
            if self.behaviour == "wrong":
                out = out.copy()
                out[-1] += 1
            blob = np.asarray(out, "<i4").tobytes()
            mem[base + where:base + where + len(blob)] = np.frombuffer(blob, np.uint8)
            beats_read = -(-read // hw.bus_bytes)
            stats = {"CYCLES": beats_read * 5 // 4 + 37, "BEATS_READ": beats_read,
                     "BEATS_WRITTEN": -(-len(blob) // hw.bus_bytes)}
            for name, value in stats.items():
                self.regs[REG(name).offset] = value
            self.stats.append(dict(stats, op=cmd["op"]))
            self._end(False)

    return FakeBoard


class FakeClocks:
    fclk0_mhz = MHZ


@pytest.fixture
def make_board(pynq, monkeypatch, tmp_path):
    """make_board(ident=..., overlay=True, engine_type=ENGINE_VLNV, ...) -> the board; board.bit is its
    overlay's .bit (with the .hwh beside it), pynq now 'on' it."""
    FakeBoard = board_class(pynq)

    def make(ident=None, overlay=True, engine_type=ENGINE_VLNV, engine_name="gpt_fpga_engine_0", span=0x10000,
             **kw):
        board = FakeBoard(ident or identity_regs(), **kw)
        folder = tmp_path / "overlay"
        folder.mkdir(exist_ok=True)
        board.bit = folder / "gpt_fpga.bit"
        if overlay:
            board.bit.write_bytes(b"bit")
            board.bit.with_suffix(".hwh").write_text("<hwh/>")

        class FakeInterrupt:  # the stand-in's: pynq.Interrupt's API over the board's interrupt line
            def __init__(self, pinname):
                if pinname not in board.interrupt_pins:
                    raise ValueError(f"No Pin of name {pinname} found")

            async def wait(self):  # pynq's Interrupt.wait is a coroutine
                while not (board.irq == "wired" and board.irq_line()):
                    await asyncio.sleep(2e-4)
                board.log.append(("irq", 1))

        # what pynqmetadata's interrupt views make of the overlay's block design (an "absent" interrupt:
        # an overlay whose engine interrupt reaches no axi_intc, so PYNQ 3.x lists none)
        pin = f"{engine_name}/interrupt"
        engine_irqs = {} if board.irq == "absent" else {"interrupt": {"controller": "axi_intc", "index": 0,
                                                                       "fullpath": pin}}
        board.interrupt_pins = {d["fullpath"]: dict(d) for d in engine_irqs.values()}
        board.interrupt_controllers = {"axi_intc": {"parent": "", "index": 0, "raw_irq": FABRIC_IRQ}}
        board.timestamp = f"fake overlay {id(board)}"  # a new overlay: pynq drops its controllers
        board.ip_dict = {
            "processing_system7_0": {"type": "xilinx.com:ip:processing_system7:5.5", "phys_addr": 0,
                                     "addr_range": 0},
            "axi_intc": {"type": "xilinx.com:ip:axi_intc:4.1", "phys_addr": INTC_BASE, "addr_range": 0x10000,
                         "fullpath": "axi_intc", "interrupts": {}},
            engine_name: {"type": engine_type, "phys_addr": BASE, "addr_range": span, "fullpath": engine_name,
                          "interrupts": engine_irqs},
        }

        class FakeOverlay:
            def __init__(self, bitfile_name, download=True, **kw2):
                if not Path(bitfile_name).is_file():
                    raise OSError(f"Bitstream file {bitfile_name} does not exist.")
                board.log.append(("download", bitfile_name, download))
                self.device = board
                self.ip_dict = board.ip_dict

        monkeypatch.setattr(pynq, "Overlay", FakeOverlay)
        monkeypatch.setattr(pynq, "Clocks", FakeClocks)
        if REAL_PYNQ:
            wire_pynq_interrupts(pynq, board, monkeypatch)
        else:
            monkeypatch.setattr(pynq.overlay, "Interrupt", FakeInterrupt)
        monkeypatch.setattr(pynq.Device, "_devices", [board], raising=False)
        monkeypatch.setattr(pynq.Device, "_active_device", board, raising=False)
        return board

    return make


def wire_pynq_interrupts(pynq, board, monkeypatch):
    """pynq's own interrupt path for `board`: pynq's MockInterruptController as the axi_intc at INTC_BASE,
    its MockUioController as the UIO device of IRQ_F2P[0] (raw IRQ 61), found through pynq.interrupt's
    get_uio_irq / UioController as pynq's tests/test_interrupt.py does it."""
    import pynq.interrupt as pin

    mocks = pynq_test_module(pynq, "test_interrupt")
    uio = mocks.MockUioController()
    board.intc = mocks.MockInterruptController(INTC_BASE, callback=uio.set_line)
    monkeypatch.setattr(pin, "get_uio_irq", lambda irq: f"/dev/uio-irq{irq}" if irq == FABRIC_IRQ else None)
    monkeypatch.setattr(pin, "UioController", lambda device: uio)
    monkeypatch.setattr(pin._InterruptController, "_uio_devices", {})  # one UIO per board, not pynq's cache
    monkeypatch.setattr(pin._InterruptController, "_controllers", [])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("pynq-images")
    made = {}
    for name, weights, kw in (("gpt2-int8", "int8", dict(vocab=64, d=32, heads=2, layers=2, n_ctx=16)),
                              ("gpt2-int4", "int4", dict(vocab=64, d=32, heads=2, layers=1, n_ctx=16))):
        cfg = make_config("gpt2", **kw)
        model = write_checkpoint(out / name, cfg, random_tensors(cfg, seed=3))
        quantize_checkpoint(model, out / f"{name}.img", weights=weights, calib_tokens=16, progress=False)
        made[name] = out / f"{name}.img"
    return made


def writes(board, name):
    return [e for e in board.log if e[0] == "write" and e[1] == name]


# ---------------------------------------------------------------------------------------------------
# the device

def test_registers_at_the_register_maps_offsets(make_board, images, pynq):
    board = make_board()
    dev = PynqDevice(board.bit)
    assert isinstance(dev.ip, pynq.DefaultIP) and ENGINE_VLNV in type(dev.ip).bindto
    assert dev.base == BASE and dev.ip_name == "gpt_fpga_engine_0"
    assert dev.read_reg(REG("ID").offset) == rm.ENGINE_MAGIC
    for r in rm.REGISTERS:  # every register by its offset: the fake decodes the address with the same map
        if r.access == "rw":
            dev.write_reg(r.offset, 0x5A)
            assert board.reg(r.name) == 0x5A and dev.read_reg(r.offset) == 0x5A, r.name
    board.use_image(images["gpt2-int8"])
    driver = Driver(read_image(images["gpt2-int8"]), dev)
    driver.step(5)
    written = {e[1] for e in board.log if e[0] == "write"}
    assert {"DESC_ADDR", "IRQ_ENABLE", "POSITION", "COMMAND", "CONTROL", "IRQ_STATUS"} <= written
    assert board.reg("DESC_ADDR") == driver.desc_addr
    assert all(buf.device_address >= DDR_BASE for buf in dev.buffers)
    assert ("download", str(board.bit.absolute()), True) in board.log


def test_flush_before_start_and_invalidate_after(make_board, images):
    board = make_board()
    board.use_image(images["gpt2-int8"])
    dev = PynqDevice(board.bit)
    image = read_image(images["gpt2-int8"])
    driver = Driver(image, dev)
    weights, state = (b.device_address for b in (driver.weights, driver.state))
    assert ("allocate", driver.weights.nbytes, True) in board.log  # cacheable=True
    assert ("flush", weights, 0, driver.weights.nbytes) in board.log
    ids = [3, 9, 1]
    want = FixedModel(image).forward_int(ids)
    for pos, tok in enumerate(ids):
        board.log.clear()
        assert np.array_equal(driver.step(tok), want[pos])
        events = [e[0] if e[0] != "write" else e[1] for e in board.log]
        starts = [i for i, e in enumerate(events) if e == "start"]
        assert len(starts) == image.header["config"]["n_layer"] + 1
        flushes = [i for i, e in enumerate(board.log) if e[0] == "flush" and e[1] == state]
        invalidates = [i for i, e in enumerate(board.log) if e[0] == "invalidate" and e[1] == state]
        assert flushes and flushes[-1] < starts[0], events  # the residual reaches DDR before the engine runs
        assert invalidates and invalidates[-1] > starts[-1], events  # the logits are read after invalidating
    # the fake is not coherent: without the flush the engine reads stale DDR and the command fails
    board.drop_flush = True
    with pytest.raises(EngineError, match="LAYER 0 at position 0 ended with error descriptor"):
        Driver(image, dev).step(1)


def test_buffers_are_pynq_buffers_with_flush_and_invalidate(make_board, pynq, monkeypatch):
    """pynq's MockAllocateDevice sees each flush and invalidate with the buffer's bo, offset and length."""
    dev = PynqDevice(make_board().bit)
    mocks = pynq_mock_devices(pynq)
    mock_cls = mocks.MockAllocateDevice
    seen = []

    class Cacheable(mock_cls):
        def allocate(self, shape, dtype, cacheable=False):
            seen.append((tuple(shape), np.dtype(dtype), cacheable))
            return super().allocate(shape, dtype)

    mock = Cacheable("mock_allocate")
    monkeypatch.setattr(pynq.Device, "_active_device", mock, raising=False)
    with mock.check_memops(allocates=[("bo1", False, 0x1234_0000)], flushes=[("bo1", 0, 4096)],
                           invalidates=[("bo1", 0, 4096), ("bo1", 64, 16)]):
        buf = dev.allocate(4096)
        buf[:8] = 7
        buf.flush()
        buf.invalidate()
        buf[64:80].invalidate()
    assert seen == [((4096,), np.dtype(np.uint8), True)]
    if REAL_PYNQ:  # pynq's own buffer and mock, not look-alikes
        assert type(buf).__module__ == "pynq.buffer" and "site-packages" in mocks.__file__
    assert buf.device_address == 0x1234_0000 and dev.allocated == 4096


def test_command_timeout_names_the_status_bits(make_board, images, capsys):
    board = make_board(behaviour="hang")
    board.use_image(images["gpt2-int8"])
    t0 = time.monotonic()
    rc, out, err = run_cli(capsys, "generate", images["gpt2-int8"], "--backend", "pynq", "--overlay", board.bit,
                           "--ids", "1", "--max-new-tokens", "1")
    assert time.monotonic() - t0 < 10
    assert_one_line_error(rc, err, "LAYER 0 at position 0 did not finish within", "STATUS busy=1 done=0",
                          "aborted")
    assert writes(board, "CONTROL")[-1][2] == REG("CONTROL").pack(abort=1)


def test_not_enough_contiguous_memory(make_board, images, capsys):
    data_size = read_image(images["gpt2-int8"]).header["data_size"]
    board = make_board(cma_bytes=data_size + 1024)  # the weights fit, the state buffer does not
    board.use_image(images["gpt2-int8"])
    rc, out, err = run_cli(capsys, "generate", images["gpt2-int8"], "--backend", "pynq", "--overlay", board.bit,
                           "--ids", "1")
    assert_one_line_error(rc, err, "could not allocate", "MB of contiguous memory", "MB in all with the "
                          f"{data_size / 2**20:.1f} MB already allocated", "BO allocation failed", "128 MB",
                          "int4", "cma=")
    assert [e[0] for e in board.log].count("allocate") == 2
    assert board.live == 0  # the weights allocated before the failure were given back
    with pytest.raises(CmaError):
        PynqDevice(board.bit).allocate(1 << 20)
    board.alloc_error = "Multiple memories active in design: specify the memory using the `target` parameters"
    with pytest.raises(BoardError, match="HP port must reach the PS DDR") as e:
        PynqDevice(board.bit).allocate(1 << 20)
    assert not isinstance(e.value, CmaError)


def test_missing_overlay_files(make_board, capsys, monkeypatch, tmp_path):
    board = make_board(overlay=False)
    bit, hwh = board.bit.absolute(), board.bit.with_suffix(".hwh").absolute()
    with pytest.raises(OverlayError) as e:
        PynqDevice(board.bit)
    assert f"{bit} and {hwh} are missing" in str(e.value) and "make bitstream" in str(e.value)
    bit.write_bytes(b"bit")
    rc, out, err = run_cli(capsys, "board-check", "--overlay", bit)
    assert_one_line_error(rc, err, f"{hwh} is missing", "make bitstream", "--overlay")
    # the default: $GPT_FPGA_OVERLAY, else build/overlay/gpt_fpga.bit from the current directory
    monkeypatch.setenv(OVERLAY_ENV, str(tmp_path / "x" / "ov.hwh"))
    assert overlay_path() == tmp_path / "x" / "ov.bit"
    monkeypatch.delenv(OVERLAY_ENV)
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "board-check")
    assert_one_line_error(rc, err, str(tmp_path / "build" / "overlay" / "gpt_fpga.bit"), "gpt_fpga.hwh")


def test_not_on_a_board(pynq, monkeypatch, capsys, images):
    # pynq present, no device: the real pynq finds none on this machine; the stand-in has none either
    monkeypatch.setattr(pynq.Device, "_devices", [], raising=False)
    with pytest.raises(NotOnBoardError, match="not on a board: pynq found no PYNQ device"):
        PynqDevice()
    rc, out, err = run_cli(capsys, "board-check")
    assert_one_line_error(rc, err, "not on a board", "PYNQ image")
    # pynq not installed
    monkeypatch.setitem(sys.modules, "pynq", None)
    for argv in (["board-check"], ["generate", images["gpt2-int8"], "--backend", "pynq", "--ids", "1"]):
        rc, out, err = run_cli(capsys, *argv)
        assert_one_line_error(rc, err, "not on a board: pynq is not installed", "pip install '.[board]'",
                              "Python 3.10")


def test_bitstream_that_does_not_match_the_image(make_board, images, capsys):
    board = make_board()  # an int8 engine; the image is int4
    rc, out, err = run_cli(capsys, "generate", images["gpt2-int4"], "--backend", "pynq", "--overlay", board.bit,
                           "--ids", "1")
    assert_one_line_error(rc, err, "the engine does not match", "weights int8", "gpt-fpga quantize")
    assert not [e for e in board.log if e[0] == "allocate"]
    board = make_board(ident=identity_regs(ID=0))
    rc, out, err = run_cli(capsys, "generate", images["gpt2-int8"], "--backend", "pynq", "--overlay", board.bit,
                           "--ids", "1")
    assert_one_line_error(rc, err, "no gpt-fpga engine answers")


def test_overlay_without_the_engine(make_board):
    board = make_board(engine_type="xilinx.com:ip:axi_gpio:2.0", engine_name="axi_gpio_0")
    with pytest.raises(OverlayError, match="has no xilinx.com:module_ref:gpt_fpga_engine:1.0 .*axi_gpio_0"):
        PynqDevice(board.bit)
    board = make_board(engine_type="user.org:module_ref:gpt_fpga_engine:1.1")  # found by name
    assert PynqDevice(board.bit).ip_name == "gpt_fpga_engine_0"
    board = make_board(span=0x40)
    with pytest.raises(OverlayError, match="its registers need 128"):
        PynqDevice(board.bit)


def test_generate_on_the_board_equals_fixed(make_board, images, capsys):
    board = make_board()
    board.use_image(images["gpt2-int8"])
    common = ["--ids", "3,1,4", "--max-new-tokens", "5"]
    rc, fixed, err = run_cli(capsys, "generate", images["gpt2-int8"], "--backend", "fixed", *common)
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "generate", images["gpt2-int8"], "--backend", "pynq", "--overlay", board.bit,
                           *common)
    assert rc == 0, err
    assert out == fixed
    rc, out, err = run_cli(capsys, "generate", images["gpt2-int8"], "--backend", "fixed", "--overlay", board.bit,
                           *common)
    assert_one_line_error(rc, err, "--overlay applies to --backend pynq only")


def test_interrupt_wait(make_board, images):
    """wait="irq": every command ends on its interrupt (with the real pynq: pynq's Interrupt through its
    axi_intc driver, acknowledged once per command); a hang times out; no interrupt is one line."""
    board = make_board()
    board.use_image(images["gpt2-int8"])
    image = read_image(images["gpt2-int8"])
    dev = PynqDevice(board.bit, wait="irq")
    assert dev.irq is not None and dev.irq_problem is None
    if REAL_PYNQ:
        import pynq.interrupt

        assert isinstance(dev.irq, pynq.interrupt.Interrupt)
    want = FixedModel(image).forward_int([2, 7])
    assert np.array_equal(Driver(image, dev).forward_int([2, 7]), want)
    starts, irqs = (sum(1 for e in board.log if e[0] == kind) for kind in ("start", "irq"))
    assert starts == 2 * 3 and irqs == starts  # 2 positions x (2 layers + head), one interrupt each
    if REAL_PYNQ:  # pynq's controller left input 0 disabled and nothing pending once handled
        assert board.intc.MER == 3 and board.intc.IER == 0 and board.intc.ISR == 0
    board.behaviour = "hang"
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="did not finish within 0.05 s"):
        Driver(image, dev, timeout_s=0.05).step(1)
    assert time.monotonic() - t0 < 5
    board = make_board(irq="absent")  # an overlay whose engine interrupt reaches no axi_intc
    with pytest.raises(OverlayError) as e:
        PynqDevice(board.bit, wait="irq")
    assert "\n" not in str(e.value)
    assert "wait='irq' needs the engine's interrupt: the overlay connects no interrupt of the engine to an " \
           "axi_intc" in str(e.value) and "make bitstream" in str(e.value)
    assert PynqDevice(board.bit).irq is None  # polling needs no interrupt


# ---------------------------------------------------------------------------------------------------
# board-check

def table(out: str) -> dict[str, tuple[str, str]]:
    """{check: (result, detail)} from board-check's table."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("check "))
    w = lines[head].index("result")
    rows = {}
    for line in lines[head + 2:]:
        if not line.strip():
            break
        rows[line[:w].strip()] = (line[w:w + 6].strip(), line[w + 8:])
    return rows


@pytest.fixture
def spy_builds(monkeypatch):
    """Give the fake engine the image board-check builds (it computes with the fixed model)."""
    boards = []
    real = bc.build_check_image

    def spy(ident, out_dir):
        path = real(ident, out_dir)
        for b in boards:
            b.use_image(path)
        return path

    monkeypatch.setattr(bc, "build_check_image", spy)
    return boards


def test_board_check_table(make_board, spy_builds, capsys):
    board = make_board()
    spy_builds.append(board)
    rc, out, err = run_cli(capsys, "board-check", "--overlay", board.bit)
    assert rc == 0, out + err
    rows = table(out)
    assert out.splitlines()[0].startswith("gpt-fpga ") and f"0x{BASE:08x}" in out.splitlines()[0]
    for name in ("engine ID", "register map version", "contract version", "image format version",
                 "DMA read + write", "LAYER 0", "decode", "interrupt"):
        assert rows[name][0] == "ok", (name, rows[name])
    assert rows["engine build"] == ("info", f"int8 weights, 64-bit bus (1 port of 64 bits); d_in <= {nx.MAX_D_IN}, context <= "
                                    f"{nx.MAX_CONTEXT}, head_dim <= {nx.MAX_HEAD_DIM}")
    assert rows["clock (FCLK0)"][1].startswith("100 MHz")
    assert rows["test image"][1].startswith("built: check-int8.img, gpt2 2 layers, d_model 128, vocab 8192")
    head = next(s for s in board.stats if s["op"] == rm.OP_HEAD)
    gbs = head["BEATS_READ"] * 8 / head["CYCLES"] * MHZ * 1e6 / 1e9
    assert rows["read bandwidth"][1].startswith(f"{gbs:.3f} GB/s (HEAD: {head['BEATS_READ']} beats of 8 B in "
                                                f"{head['CYCLES']} cycles at 100 MHz")
    assert head["BEATS_READ"] > (1 << 20) // 8  # the 1 MiB lm_head: a weight-heavy command
    assert "8 ok, 0 failed" in out
    assert board.live == 0  # board-check gives its buffers back


def test_board_check_reports_failures(make_board, spy_builds, capsys, images):
    board = make_board(behaviour="wrong", irq="silent")
    spy_builds.append(board)
    rc, out, err = run_cli(capsys, "board-check", "--overlay", board.bit)
    assert rc == 1, out + err
    rows = table(out)
    assert rows["DMA read + write"][0] == "FAIL" and "of 8192 logits differ" in rows["DMA read + write"][1]
    assert rows["LAYER 0"][0] == "FAIL" and "residual values differ" in rows["LAYER 0"][1]
    assert rows["decode"][0] == "FAIL"
    assert rows["interrupt"][0] == "FAIL" and "IRQ_F2P[0]" in rows["interrupt"][1]
    # a bitstream from another version: identity fails, the rest is skipped
    board = make_board(ident=identity_regs(VERSION=REG("VERSION").pack(contract=nx.CONTRACT_VERSION,
                                                                       image_format=FORMAT_VERSION, regmap=99)))
    rc, out, err = run_cli(capsys, "board-check", "--overlay", board.bit)
    rows = table(out)
    assert rc == 1 and rows["register map version"][0] == "FAIL" and f"99 (this package: {rm.REGMAP_VERSION})" in out
    assert rows["DMA read + write"][0] == "skip" and rows["decode"][0] == "skip"
    # --image that does not fit the engine; an engine without an interrupt only warns
    board = make_board(irq="absent")
    rc, out, err = run_cli(capsys, "board-check", "--overlay", board.bit, "--image", images["gpt2-int4"])
    rows = table(out)
    assert rc == 1 and rows["DMA read + write"][0] == "FAIL" and "does not match" in rows["DMA read + write"][1]
    board = make_board(irq="absent")
    board.use_image(images["gpt2-int8"])
    rc, out, err = run_cli(capsys, "board-check", "--overlay", board.bit, "--image", images["gpt2-int8"])
    rows = table(out)
    assert rc == 0, out
    assert rows["test image"][1].startswith("given: gpt2-int8.img")
    assert rows["interrupt"][0] == "warn" and "polls STATUS" in rows["interrupt"][1]


@pytest.mark.parametrize("weights,group,bus_bits", [("int8", 0, 64), ("int4", 32, 64), ("int4", 128, 128)])
def test_check_image_fits_every_engine_build(tmp_path, weights, group, bus_bits):
    ident = {"HW_CONFIG": {"bus_bits": bus_bits, "weights": rm.WEIGHT_CODES[weights], "group": group},
             "MAX_D_IN": nx.MAX_D_IN, "MAX_CONTEXT": nx.MAX_CONTEXT, "MAX_HEAD_DIM": nx.MAX_HEAD_DIM}
    image = read_image(bc.build_check_image(ident, tmp_path))
    assert image.header["hardware"]["weights"] == weights and image.hw.bus_bits == bus_bits
    assert FixedModel(image).forward_int([1]).shape == (1, bc.CHECK_VOCAB)
    small = dict(ident, MAX_D_IN=64, MAX_HEAD_DIM=16, MAX_CONTEXT=8)
    if group <= 64:
        shape = bc.check_model_shape(small)
        assert shape["d_ff"] <= 64 and shape["d"] // shape["heads"] <= 16 and shape["n_ctx"] == 8
