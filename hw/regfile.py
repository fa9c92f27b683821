"""The engine's AXI4-Lite register file, generated from ``contract/registers.REGISTERS``.

Nothing here knows an offset, a width or an access kind: every register, its port and its
behaviour come from the contract's table, so the host driver, ``docs/registers.md`` and the gateware
cannot disagree. The engine uses :func:`field` (and :func:`pack`) to reach a named field of a
register's word, so it never writes a bit position either.

Ports (``RegisterFile`` attributes), per register, named after it in lower case:

=======  =======================  =============================================================
access   port(s)                  behaviour
=======  =======================  =============================================================
``ro``   ``In(32)`` ``<reg>``     driven by the engine; sampled on the clock edge that accepts the
                                  read address (AR handshake)
``rw``   ``Out(32)`` ``<reg>``    the current value, reset 0; a host write replaces the bytes whose
                                  ``wstrb`` bit is set
``w1s``  ``Out(32)`` ``<reg>``    for one cycle, the 1 bits of a host write (strobed bytes); 0
                                  otherwise; reads return 0
``w1c``  ``In(32)`` ``<reg>_set`` the engine holds a bit at 1 for a cycle to set it;
         ``Out(32)`` ``<reg>``    the current value, reset 0; a host write of 1 (strobed byte)
                                  clears a bit; a set and a clear in the same cycle: set wins
=======  =======================  =============================================================

Bits no field of the register defines are reserved: they read 0, writes to them are ignored, and
the ``Out`` ports hold 0 there (so they cost no flip-flops); an ``ro`` input's reserved bits are not
read. ``wstrb`` is honoured per byte for every writable kind (rw, w1s, w1c).

Bus behaviour (AXI4-Lite, 32-bit data, ``addr_bits`` address bits; ``awprot``/``arprot`` ignored):

* Addresses are decoded by word (``addr[2:]``); the two low address bits are ignored.
* Reads of an offset no register occupies return 0 with OKAY; so do reads of a ``w1s`` register.
  Writes to an ``ro`` register or an unmapped offset are ignored and answered OKAY. Every
  response is OKAY (``bresp`` and ``rresp`` are constant 0).
* Write: AW and W are each taken into a one-entry holding register (``awready`` / ``wready`` are
  high while it is empty), in either order or in the same cycle. On the first clock edge at which
  both are held and no B response is pending, the write takes effect (register updated, ``w1s``
  pulse starts) and ``bvalid`` rises on that same edge, so B is never seen before the write took
  effect. ``bvalid`` stays high (``bresp`` stable) until ``bready``.
* Read: ``arready`` is ``~rvalid``. The edge that accepts AR samples the register into ``rdata``
  and raises ``rvalid``; ``rvalid``/``rdata`` hold until ``rready``.
* Reads and writes run independently of each other (a read in the same cycle as a write to the
  same register returns the value before the write).
* No combinational path from any input to any output: every ready and valid is a register or the
  inverse of one.

Timing, no stalls (cycle 0 = the cycle in which the manager presents the request):

* write, AW and W together: accepted at the end of cycle 0, takes effect at the end of cycle 1
  (``bvalid`` high in cycle 2, the new value and the ``w1s`` pulse visible in cycle 2); one write
  every 2 cycles back to back. AW and W in different cycles: effect one cycle after the later one
  is accepted.
* read: accepted at the end of cycle 0, ``rvalid`` and ``rdata`` in cycle 1; one read every 2
  cycles back to back (the next AR is accepted the cycle after the R handshake).

A synchronous reset (``rst``) at any time, mid-transaction included, clears the holding registers,
any pending B or R, and every ``rw`` and ``w1c`` value; the manager must reset with it (AXI
requires both ends to leave reset together).
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from gpt_fpga.hw.axi import RESP_OKAY, AxiLiteSignature
from gpt_fpga.contract import registers

__all__ = ["RegisterFile", "field", "pack", "port_name", "set_port_name", "lookup"]

WORD_BITS = 8 * registers.REGISTER_BYTES  # 32
ACCESS_KINDS = ("ro", "rw", "w1s", "w1c")


def lookup(name: str, regs=registers.REGISTERS) -> registers.Register:
    """The register called `name` (exact, upper case as in the table); KeyError naming the known ones."""
    for r in regs:
        if r.name == name:
            return r
    raise KeyError(f"no register {name!r} (registers: {', '.join(r.name for r in regs)})")


def port_name(reg: registers.Register) -> str:
    """The register file's port carrying `reg`: its name in lower case (``COMMAND`` -> ``command``)."""
    return reg.name.lower()


def set_port_name(reg: registers.Register) -> str:
    """The input by which the engine sets bits of a ``w1c`` register: ``<reg>_set``."""
    return f"{port_name(reg)}_set"


def field_mask(reg: registers.Register) -> int:
    """The bits of `reg` that some field defines (the others are reserved: read 0, written nowhere)."""
    mask = 0
    for f in reg.fields:
        mask |= f.mask
    return mask


def field(word: Value, register: str, name: str) -> Value:
    """The bits of field `name` of register `register` in the 32-bit `word` (a slice: readable, and
    assignable when `word` is).

    ``field(regs.status, "STATUS", "busy").eq(busy)`` drives STATUS.busy;
    ``field(regs.command, "COMMAND", "layer")`` reads COMMAND.layer. Unknown names raise KeyError.
    """
    f = lookup(register).field(name)
    word = Value.cast(word)
    if len(word) != WORD_BITS:
        raise ValueError(f"field {register}.{name}: expected a {WORD_BITS}-bit register word, got {len(word)} bits")
    return word[f.lsb:f.lsb + f.width]


def pack(register: str, **values) -> Value:
    """The 32-bit word of `register` with each named field driven by a value (Amaranth value or int)
    no wider than the field; reserved bits and unnamed fields 0.

    ``m.d.comb += regs.status.eq(pack("STATUS", busy=busy, done=done, error=err))``.
    """
    reg = lookup(register)
    parts = []
    for name, value in values.items():
        f = reg.field(name)
        if isinstance(value, int):
            f.put(value)  # ValueError when it does not fit
            value = Const(value, f.width)
        value = Value.cast(value).as_unsigned()
        if len(value) > f.width:
            raise ValueError(f"field {register}.{name} is {f.width} bits wide; got a {len(value)}-bit value")
        parts.append((f.lsb, f.width, value))
    out, pos = [], 0
    for lsb, width, value in sorted(parts, key=lambda p: p[0]):
        out += [Const(0, lsb - pos), value, Const(0, width - len(value))]
        pos = lsb + width
    out.append(Const(0, WORD_BITS - pos))
    return Cat(*out)


class RegisterFile(wiring.Component):
    """AXI4-Lite subordinate holding the engine's registers, generated from a register table.

    Behaviour, ports and timing: see this module's docstring. Parameters default to the engine's
    map (``registers.REGISTERS``, ``registers.ADDRESS_BITS``); another table of
    ``registers.Register`` works the same way.

    Attributes
    ----------
    s_axi : In(AxiLiteSignature(addr_bits=addr_bits))
        The host's port.
    <reg> : In(32) for ro, Out(32) for rw / w1s / w1c
        One per register, named ``port_name(reg)``.
    <reg>_set : In(32)
        One per w1c register.
    """

    def __init__(self, regs=registers.REGISTERS, *, addr_bits: int = registers.ADDRESS_BITS):
        self.regs = self._checked(tuple(regs), addr_bits)  # rejected: warning filtered in pyproject.toml
        self.addr_bits = addr_bits
        members = {"s_axi": In(AxiLiteSignature(addr_bits=addr_bits, data_bits=WORD_BITS))}
        for r in self.regs:
            if r.access == "ro":
                members[port_name(r)] = In(WORD_BITS)
            elif r.access in ("rw", "w1s"):
                members[port_name(r)] = Out(WORD_BITS)
            else:  # w1c
                members[set_port_name(r)] = In(WORD_BITS)
                members[port_name(r)] = Out(WORD_BITS)
        super().__init__(members)

    @staticmethod
    def _checked(regs: tuple, addr_bits: int) -> tuple:
        if not isinstance(addr_bits, int) or isinstance(addr_bits, bool) or not 3 <= addr_bits <= 32:
            raise ValueError(f"addr_bits must be an int in [3, 32], got {addr_bits!r}")
        if not regs:
            raise ValueError("a register file needs at least one register")
        offsets, ports = set(), {"s_axi", "clk", "rst"}
        for r in regs:
            if not isinstance(r, registers.Register):
                raise TypeError(f"not a registers.Register: {r!r}")
            if r.access not in ACCESS_KINDS:
                raise ValueError(f"register {r.name}: access {r.access!r} is not one of {ACCESS_KINDS}")
            if r.offset % registers.REGISTER_BYTES or not 0 <= r.offset < 1 << addr_bits:
                raise ValueError(f"register {r.name}: offset 0x{r.offset:X} is not a word offset below "
                                 f"2**{addr_bits}")
            if r.offset in offsets:
                raise ValueError(f"register {r.name}: offset 0x{r.offset:X} is taken twice")
            offsets.add(r.offset)
            names = [port_name(r)] + ([set_port_name(r)] if r.access == "w1c" else [])
            for n in names:
                if not n.isidentifier() or n in ports:
                    raise ValueError(f"register {r.name}: port name {n!r} is not a free identifier")
                ports.add(n)
            if field_mask(r) >> WORD_BITS:
                raise ValueError(f"register {r.name}: a field lies above bit {WORD_BITS - 1}")
        return regs

    @property
    def write_cycles(self) -> int:
        """Cycles between back-to-back writes (AW and W together, bready high): 2."""
        return 2

    @property
    def read_cycles(self) -> int:
        """Cycles between back-to-back reads (rready high): 2."""
        return 2

    @property
    def read_latency(self) -> int:
        """Cycles from the AR handshake to ``rvalid``: 1."""
        return 1

    @property
    def write_latency(self) -> int:
        """Cycles from the handshake of the later of AW and W to ``bvalid`` (and the write's effect): 2
        (accepted at the end of cycle 0, effect at the end of cycle 1, visible in cycle 2)."""
        return 2

    def elaborate(self, platform):
        m = Module()
        ax = self.s_axi
        word_bits = self.addr_bits - 2

        m.d.comb += [ax.bresp.eq(RESP_OKAY), ax.rresp.eq(RESP_OKAY)]

        # ---- write: AW and W into one-entry holding registers, then one write when both are held
        aw_have, aw_word = Signal(), Signal(word_bits)
        w_have, w_data, w_strb = Signal(), Signal(WORD_BITS), Signal(WORD_BITS // 8)
        m.d.comb += [ax.awready.eq(~aw_have), ax.wready.eq(~w_have)]
        with m.If(ax.awvalid & ax.awready):
            m.d.sync += [aw_have.eq(1), aw_word.eq(ax.awaddr[2:])]
        with m.If(ax.wvalid & ax.wready):
            m.d.sync += [w_have.eq(1), w_data.eq(ax.wdata), w_strb.eq(ax.wstrb)]

        do_write = Signal()
        m.d.comb += do_write.eq(aw_have & w_have & ~ax.bvalid)
        with m.If(do_write):
            m.d.sync += [aw_have.eq(0), w_have.eq(0), ax.bvalid.eq(1)]
        with m.If(ax.bvalid & ax.bready):
            m.d.sync += ax.bvalid.eq(0)

        strobed = Signal(WORD_BITS)  # the strobed bytes of the held write
        m.d.comb += strobed.eq(Cat(*(w_strb[i].replicate(8) for i in range(WORD_BITS // 8))))

        for r in self.regs:
            mask = field_mask(r)
            hit = do_write & (aw_word == r.offset >> 2)
            port = getattr(self, port_name(r))
            if r.access == "rw":
                keep = ~(strobed & mask)
                with m.If(hit):
                    m.d.sync += port.eq((port & keep) | (w_data & strobed & mask))
            elif r.access == "w1s":
                m.d.sync += port.eq(Mux(hit, w_data & strobed & mask, 0))
            elif r.access == "w1c":
                clear = Mux(hit, w_data & strobed, 0)
                m.d.sync += port.eq(((port & ~clear) | getattr(self, set_port_name(r))) & mask)

        # ---- read: AR sampled into rdata, held until the R handshake
        m.d.comb += ax.arready.eq(~ax.rvalid)
        with m.If(ax.arvalid & ax.arready):
            m.d.sync += ax.rvalid.eq(1)
            with m.Switch(ax.araddr[2:]):
                for r in self.regs:
                    if r.access == "w1s":
                        continue  # reads 0, as unmapped
                    with m.Case(r.offset >> 2):
                        m.d.sync += ax.rdata.eq(getattr(self, port_name(r)) & field_mask(r))
                with m.Default():
                    m.d.sync += ax.rdata.eq(0)
        with m.Elif(ax.rvalid & ax.rready):
            m.d.sync += ax.rvalid.eq(0)
        return m
