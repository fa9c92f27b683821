"""The PYNQ board as a device: the engine's registers, its DMA buffers and its "done" behind the driver's protocol.

``PynqDevice`` is what ``--backend pynq`` and ``gpt-fpga board-check`` drive: the same small protocol as
the Verilator device (``host/rtl_device.py``), served by pynq on the board:

* ``pynq.Overlay`` loads ``gpt_fpga.bit`` and its ``gpt_fpga.hwh`` (same basename, made by
  ``make bitstream``). The engine is the IP whose VLNV is ``xilinx.com:module_ref:gpt_fpga_engine:1.0``
  (or, failing that, whose name says ``gpt_fpga_engine``); :class:`EngineIP`, a ``pynq.DefaultIP``
  bound to that VLNV, is its driver: ``read_reg`` / ``write_reg`` are its MMIO at the register map's
  offsets (``contract/registers.py``).
* ``allocate`` is ``pynq.allocate(shape, dtype=np.uint8, cacheable=True)``: physically contiguous (CMA)
  buffers the engine reaches through the HP port. The HP ports are not cache-coherent, so the driver
  flushes a buffer after writing it and before the engine reads it, and invalidates it after the engine
  wrote it and before reading (``host/driver.py``). A failed allocation ends with :class:`CmaError`,
  which says how many MB were needed and the two ways out.
* ``wait_interrupt`` **polls STATUS** by default (``wait="poll"``): a read every few microseconds for the
  first millisecond, then every 100 us. A command streams kilobytes to megabytes (tens of microseconds
  to milliseconds), so polling costs at most ~0.1 ms per command and needs nothing else: no UIO device,
  no asyncio loop (pynq's ``Interrupt.wait`` is a coroutine, which cannot run inside a notebook's
  running loop), no dependence on how the interrupt is wired; and no wake-up latency per command,
  of which a token has n_layer + 1 (docs/board.md says why this is the default). ``wait="irq"`` waits on
  the engine's interrupt (its ``interrupt`` pin -> the overlay's axi_intc, input 0 -> IRQ_F2P[0]: PYNQ
  3.x gives an IP an interrupt only through an axi_intc) with pynq's ``Interrupt``, run to completion
  on the event loop pynq registered its UIO reader with; it leaves the CPU free while a command runs.
  ``board-check`` tries it and reports whether the interrupt arrives.
* ``close`` frees the buffers (``freebuffer``): the CMA pool is small and shared.

Every way this can go wrong before the engine runs ends with a one-line :class:`BoardError` (a
``GptFpgaError``): pynq not installed, not on a board, the overlay files missing, no engine in the
overlay, MMIO without root, not enough contiguous memory.

pynq is imported only when a ``PynqDevice`` is made: this module imports anywhere, and the tests
(``tests/test_pynq_device.py``) run it off the board with fake devices.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from gpt_fpga.contract import registers as rm
from gpt_fpga.contract.errors import GptFpgaError

__all__ = ["PynqDevice", "BoardError", "NotOnBoardError", "OverlayError", "CmaError", "overlay_path",
           "ENGINE_VLNV", "DEFAULT_OVERLAY", "OVERLAY_ENV"]

ENGINE_NAME = "gpt_fpga_engine"  # hw/top.py TOP_NAME: the module reference in the block design
ENGINE_VLNV = f"xilinx.com:module_ref:{ENGINE_NAME}:1.0"
DEFAULT_OVERLAY = Path("build") / "overlay" / "gpt_fpga.bit"  # make bitstream's output, from the repository root
OVERLAY_ENV = "GPT_FPGA_OVERLAY"
INSTALL_BOARD = "pip install '.[board]' on the board, with its Python 3.10 (PYNQ 3.x images)"
DEFAULT_CMA_MB = 128  # PYNQ images reserve this much contiguous memory unless cma= says otherwise
REG_SPAN = 1 << rm.ADDRESS_BITS
STATUS = rm.register("STATUS")
POLL_SPIN_S = 1e-3  # poll STATUS back to back this long, then sleep between reads
POLL_SLEEP_S = 1e-4
ALLOC_ERRORS = (RuntimeError, MemoryError, OSError)  # what pynq's allocate raises when CMA runs out
NOT_CMA = ("memories", "Overlay is not downloaded")  # ...and when the overlay's memory map is the problem


class BoardError(GptFpgaError):
    """The board, pynq or the overlay is not as the engine needs it."""


class NotOnBoardError(BoardError):
    """pynq is missing, or finds no PYNQ device."""


class OverlayError(BoardError):
    """The overlay's files are missing, or it has no engine."""


class CmaError(BoardError):
    """Not enough physically contiguous memory for the engine's buffers."""


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---- where things are ---------------------------------------------------------------------------
def overlay_path(path: str | Path | None = None) -> Path:
    """The overlay's .bit: `path`, else $GPT_FPGA_OVERLAY, else build/overlay/gpt_fpga.bit (from the
    current directory). A path ending in .hwh or without a suffix means the .bit beside it."""
    p = Path(path) if path else Path(os.environ.get(OVERLAY_ENV) or DEFAULT_OVERLAY)
    if p.suffix in ("", ".hwh"):
        p = p.with_suffix(".bit")
    return p


def check_overlay_files(path: str | Path | None = None) -> tuple[Path, Path]:
    """(bit, hwh) when both exist; else an OverlayError naming both paths and how to make them."""
    bit = overlay_path(path).absolute()
    hwh = bit.with_suffix(".hwh")
    missing = [p for p in (bit, hwh) if not p.is_file()]
    if missing:
        which = " and ".join(str(p) for p in missing)
        raise OverlayError(f"overlay not found: {which} {'is' if len(missing) == 1 else 'are'} missing (pynq needs "
                           f"{bit.name} and {hwh.name} side by side: build them with 'make bitstream' on a machine "
                           f"with Vivado and copy both to the board, then give --overlay PATH or ${OVERLAY_ENV})")
    return bit, hwh


# ---- pynq -----------------------------------------------------------------------------------------
def import_pynq():
    """The pynq module, or NotOnBoardError saying how to get it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pynq
    except ImportError as e:
        what = "pynq is not installed" if getattr(e, "name", None) in ("pynq", None) else \
            f"pynq does not import ({_one_line(e)})"
        raise NotOnBoardError(f"not on a board: {what}. --backend pynq and board-check run on a Zynq board with a "
                              f"PYNQ image: {INSTALL_BOARD}; here, use --backend fixed or rtl") from None
    except Exception as e:  # pynq's import probes the platform; anything it raises means: not a usable board
        raise NotOnBoardError(f"pynq failed to import ({_one_line(e)}): the board backend runs on a Zynq board "
                              f"with a PYNQ image") from None
    return pynq


def require_board(pynq) -> None:
    """NotOnBoardError unless pynq finds a device (off the board it finds none, and warns)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            devices = list(pynq.Device.devices)
    except Exception as e:  # noqa: BLE001 - any probe failure means there is no device to use
        devices, why = [], f" ({_one_line(e)})"
    else:
        why = ""
    if devices:
        return
    if os.path.isfile("/proc/device-tree/chosen/pynq_board"):  # a PYNQ image, but no device for us
        root = "" if os.geteuid() == 0 else " (run as root: the overlay and MMIO need it)"
        raise NotOnBoardError(f"pynq found no device on this PYNQ board{root}{why}")
    raise NotOnBoardError(f"not on a board: pynq found no PYNQ device on this {platform.machine()} machine{why}; "
                          f"--backend pynq and board-check run on a Zynq board with a PYNQ image (elsewhere use "
                          f"--backend fixed or rtl)")


_ENGINE_IP_CLASSES: list[tuple[object, type]] = []


def engine_ip_class(pynq) -> type:
    """:class:`EngineIP` for this pynq: a DefaultIP bound (``bindto``) to the engine's VLNV, so that
    ``overlay.<engine>`` is one too. Made once per pynq module (pynq imports only on the board)."""
    for module, cls in _ENGINE_IP_CLASSES:
        if module is pynq:
            return cls

    class EngineIP(pynq.DefaultIP):
        """The gpt-fpga engine's AXI4-Lite registers (contract/registers.py)."""

        bindto = [ENGINE_VLNV]

        def read_reg(self, offset: int) -> int:
            return int(self.read(offset))

        def write_reg(self, offset: int, value: int) -> None:
            self.write(offset, int(value) & 0xFFFF_FFFF)

    _ENGINE_IP_CLASSES.append((pynq, EngineIP))
    return EngineIP


def find_engine(ip_dict: dict, bit: Path) -> str:
    """The engine's name in the overlay's ip_dict: by VLNV, else by name."""
    by_vlnv = [n for n, d in ip_dict.items() if isinstance(d, dict) and d.get("type") == ENGINE_VLNV]
    found = by_vlnv or [n for n, d in ip_dict.items()
                        if ENGINE_NAME in n.rsplit("/", 1)[-1]
                        or (isinstance(d, dict) and f":{ENGINE_NAME}:" in str(d.get("type", "")))]
    if not found:
        names = ", ".join(f"{n} ({d.get('type', '?') if isinstance(d, dict) else '?'})" for n, d in ip_dict.items())
        raise OverlayError(f"{bit}: the overlay has no {ENGINE_VLNV} (its IPs: {names or 'none'}); load the overlay "
                           f"made by 'make bitstream'")
    if len(found) > 1:
        raise OverlayError(f"{bit}: the overlay has {len(found)} gpt-fpga engines ({', '.join(found)}); "
                           f"this driver runs one")
    return found[0]


def _event_loop():
    """The thread's event loop (made if there is none): pynq's UIO interrupt registers its reader on it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = asyncio.get_event_loop()
        except RuntimeError:
            loop = None
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
    return loop


def cma_info() -> str:
    """' (this board: CmaTotal X MB, CmaFree Y MB)' from /proc/meminfo, or ''."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total, free = (int(fields[k].split()[0]) * 1024 for k in ("CmaTotal", "CmaFree"))
    except (OSError, KeyError, ValueError, IndexError):
        return ""
    return f" (this board: CmaTotal {_mb(total)} MB, CmaFree {_mb(free)} MB)"


# ---- the device -----------------------------------------------------------------------------------
class PynqDevice:
    """The engine on a PYNQ board, behind host/driver.py's Device protocol.

    `overlay`: the .bit (its .hwh beside it); default $GPT_FPGA_OVERLAY or build/overlay/gpt_fpga.bit.
    `wait`: "poll" (STATUS, the default) or "irq" (the interrupt through pynq; see the module doc).
    `download`: load the bitstream (default); False uses the overlay already loaded.
    """

    def __init__(self, overlay: str | Path | None = None, *, wait: str = "poll", download: bool = True):
        if wait not in ("poll", "irq"):
            raise ValueError(f"wait is 'poll' or 'irq', not {wait!r}")
        self.wait = wait
        self.buffers: list = []
        self.allocated = 0
        self.pynq = pynq = import_pynq()
        require_board(pynq)
        self.bit, self.hwh = check_overlay_files(overlay)
        ip_class = engine_ip_class(pynq)  # before the Overlay: it binds drivers by VLNV as it loads
        self.loop = _event_loop()
        try:
            self.overlay = pynq.Overlay(str(self.bit), download=download)
        except PermissionError as e:
            raise BoardError(f"loading the overlay {self.bit} needs root ({_one_line(e)}): run gpt-fpga as root "
                             f"(sudo -E)") from None
        except Exception as e:  # noqa: BLE001 - pynq raises many kinds; all mean this overlay cannot be used
            raise OverlayError(f"pynq could not load the overlay {self.bit}: {_one_line(e)}") from None
        self.ip_name = find_engine(self.overlay.ip_dict, self.bit)
        desc = dict(self.overlay.ip_dict[self.ip_name])
        if desc.get("device") is None and getattr(self.overlay, "device", None) is not None:
            desc["device"] = self.overlay.device
        self.base = int(desc.get("phys_addr", 0))
        span = int(desc.get("addr_range", 0) or 0)
        if span < REG_SPAN:
            raise OverlayError(f"{self.bit}: the engine {self.ip_name} is mapped over {span} bytes at 0x{self.base:x}; "
                               f"its registers need {REG_SPAN} (fix the address editor in the block design)")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.ip = ip_class(desc)
        except PermissionError as e:
            raise BoardError(f"the engine's registers (MMIO at 0x{self.base:08x}) need root ({_one_line(e)}): run "
                             f"gpt-fpga as root (sudo -E)") from None
        except OSError as e:  # pynq: EnvironmentError("Root permissions required.")
            raise BoardError(f"the engine's registers (MMIO at 0x{self.base:08x}) could not be mapped "
                             f"({_one_line(e)}): run gpt-fpga as root (sudo -E)") from None
        self.irq = getattr(self.ip, "interrupt", None)
        self.irq_problem = "; ".join(str(w.message) for w in caught if "nterrupt" in str(w.message)) or None
        if self.irq is None and self.irq_problem is None:
            self.irq_problem = ("the overlay connects no interrupt of the engine to an axi_intc (PYNQ 3.x gives an "
                                "IP an interrupt only through one; overlays from make bitstream wire engine -> "
                                "axi_intc -> IRQ_F2P[0])")
        if wait == "irq" and self.irq is None:
            raise OverlayError(f"{self.bit}: wait='irq' needs the engine's interrupt: {self.irq_problem}")

    # -- registers
    def read_reg(self, offset: int) -> int:
        return self.ip.read_reg(offset)

    def write_reg(self, offset: int, value: int) -> None:
        self.ip.write_reg(offset, value)

    # -- memory
    def allocate(self, nbytes: int):
        """A cacheable, physically contiguous uint8 buffer: a pynq PynqBuffer (.device_address, .flush(),
        .invalidate()). CmaError when the contiguous memory runs out."""
        try:
            buf = self.pynq.allocate(shape=(int(nbytes),), dtype=np.uint8, cacheable=True)
        except ALLOC_ERRORS as e:
            if any(k in str(e) for k in NOT_CMA):  # pynq could not pick a memory: the overlay, not the pool
                raise BoardError(f"pynq could not allocate a buffer in this overlay's memory ({_one_line(e)}): the "
                                 f"engine's HP port must reach the PS DDR") from None
            need = self.allocated + int(nbytes)
            raise CmaError(
                f"could not allocate {_mb(nbytes)} MB of contiguous memory for the engine ({_mb(need)} MB in all "
                f"with the {_mb(self.allocated)} MB already allocated; pynq: {_one_line(e)}). PYNQ images reserve "
                f"{DEFAULT_CMA_MB} MB of CMA by default{cma_info()}: use an int4 image (gpt-fpga quantize "
                f"--weights int4, about half the bytes) or a smaller model, or enlarge CMA with the kernel's "
                f"cma= boot argument (e.g. cma=256M) and reboot") from None
        if buf.device_address is None or not 0 <= int(buf.device_address) < 1 << 32:
            addr = buf.device_address
            self._free(buf)
            raise BoardError(f"pynq placed a {_mb(nbytes)} MB buffer at {addr!r}, outside the engine's 32-bit "
                             f"address space")
        self.buffers.append(buf)
        self.allocated += int(nbytes)
        return buf

    # -- completion
    def done(self) -> bool:
        s = STATUS.unpack(self.read_reg(STATUS.offset))
        return bool(s["done"]) and not s["busy"]

    def wait_interrupt(self, timeout_s: float) -> bool:
        """True when the running command has ended (STATUS.done), False after `timeout_s`."""
        if self.wait == "poll" or self.irq is None:
            return self.poll(timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:  # an interrupt without STATUS.done (a stale one) waits again
            self.wait_irq(max(0.0, deadline - time.monotonic()))
            if self.done():
                return True
            if time.monotonic() >= deadline:
                return False

    def poll(self, timeout_s: float) -> bool:
        start = time.monotonic()
        deadline, spin_until = start + timeout_s, start + POLL_SPIN_S
        while True:
            if self.done():
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= spin_until:
                time.sleep(POLL_SLEEP_S)

    def wait_irq(self, timeout_s: float) -> bool:
        """True when the engine's interrupt arrived within `timeout_s` (pynq's Interrupt.wait, a coroutine,
        run on the loop its UIO reader is registered with). Inside a running loop (a notebook) it cannot
        block: it polls STATUS instead."""
        if self.irq is None:
            return False
        if self.loop.is_running():
            return self.poll(timeout_s)
        try:
            self.loop.run_until_complete(asyncio.wait_for(self.irq.wait(), timeout_s))
        except asyncio.TimeoutError:
            return False
        except RuntimeError as e:  # "Interrupt invalidated by Overlay change"
            raise BoardError(f"waiting for the engine's interrupt failed: {_one_line(e)}") from None
        return True

    # -- board facts
    @property
    def fclk0_mhz(self) -> float | None:
        """FCLK0 as pynq set it from the .hwh (the engine's clock), or None if pynq cannot tell."""
        try:
            return float(self.pynq.Clocks.fclk0_mhz)
        except Exception:  # noqa: BLE001 - a clock we cannot read is reported as unknown
            return None

    @property
    def pynq_version(self) -> str:
        return str(getattr(self.pynq, "__version__", "?"))

    # -- teardown
    @staticmethod
    def _free(buf):
        free = getattr(buf, "freebuffer", None)
        if free is not None:
            try:
                free()
            except Exception:  # noqa: BLE001 - freeing is best effort at teardown
                pass

    def close(self) -> None:
        """Free every buffer (the CMA pool is small). The device is unusable afterwards."""
        for buf in self.buffers:
            self._free(buf)
        self.buffers.clear()
        self.allocated = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
