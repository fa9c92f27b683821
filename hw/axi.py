"""AXI4 and AXI4-Lite signatures, named as in the AXI specification.

Members carry the AXI signal names without a prefix (``araddr``, ``rready``, ...), from the manager's
side: ``Out(Axi4ReadSignature(...))`` is a manager (master) port, ``In(...)`` a subordinate (slave)
port. The engine's top-level Verilog wrapper prefixes them with ``m_axi_`` / ``s_axi_`` so that
Vivado infers the interfaces. Bursts are INCR; the engine never issues more than 16 beats per
burst (Zynq-7000 HP ports are AXI3) nor crosses a 4 KiB boundary.
"""

from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

RESP_OKAY, RESP_EXOKAY, RESP_SLVERR, RESP_DECERR = 0, 1, 2, 3
BURST_INCR = 1
MAX_BURST_BEATS = 16  # AXI3 limit of the Zynq-7000 HP ports
BOUNDARY_BYTES = 4096  # a burst must not cross one


class Axi4ReadSignature(wiring.Signature):
    """AR and R channels of an AXI4 manager."""

    def __init__(self, *, addr_bits: int = 32, data_bits: int = 64, id_bits: int = 1):
        self.addr_bits, self.data_bits, self.id_bits = addr_bits, data_bits, id_bits
        super().__init__({
            "araddr": Out(addr_bits), "arlen": Out(8), "arsize": Out(3), "arburst": Out(2),
            "arid": Out(id_bits), "arcache": Out(4), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
            "rdata": In(data_bits), "rresp": In(2), "rlast": In(1), "rid": In(id_bits),
            "rvalid": In(1), "rready": Out(1),
        })


class Axi4WriteSignature(wiring.Signature):
    """AW, W and B channels of an AXI4 manager."""

    def __init__(self, *, addr_bits: int = 32, data_bits: int = 64, id_bits: int = 1):
        self.addr_bits, self.data_bits, self.id_bits = addr_bits, data_bits, id_bits
        super().__init__({
            "awaddr": Out(addr_bits), "awlen": Out(8), "awsize": Out(3), "awburst": Out(2),
            "awid": Out(id_bits), "awcache": Out(4), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(data_bits), "wstrb": Out(data_bits // 8), "wlast": Out(1),
            "wvalid": Out(1), "wready": In(1),
            "bresp": In(2), "bid": In(id_bits), "bvalid": In(1), "bready": Out(1),
        })


class AxiLiteSignature(wiring.Signature):
    """An AXI4-Lite manager (``In(AxiLiteSignature())`` is a register file's port)."""

    def __init__(self, *, addr_bits: int = 7, data_bits: int = 32):
        self.addr_bits, self.data_bits = addr_bits, data_bits
        super().__init__({
            "awaddr": Out(addr_bits), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(data_bits), "wstrb": Out(data_bits // 8), "wvalid": Out(1), "wready": In(1),
            "bresp": In(2), "bvalid": In(1), "bready": Out(1),
            "araddr": Out(addr_bits), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
            "rdata": In(data_bits), "rresp": In(2), "rvalid": In(1), "rready": Out(1),
        })
