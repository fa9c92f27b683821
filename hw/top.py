"""The engine as Vivado sees it: a plain Verilog top module with its AXI facts in attributes.

``verilog(engine)`` returns the Amaranth engine's Verilog plus a wrapper module
:data:`TOP_NAME` whose ports are ``aclk``, ``aresetn`` (active low, as ``proc_sys_reset`` drives
it), ``s_axi_*`` (AXI4-Lite registers), ``m_axi_*`` (the AXI4 manager to DDR, read and write
halves under one prefix), with a two-port engine ``m_axi1_*`` (its second manager, read channels
only: AR and R) and ``interrupt`` (level, active high). The names alone would let Vivado infer
the interfaces; the attributes make them explicit, as UG994 ("HDL Parameters for Interface
Inference") gives for a module reference: ``X_INTERFACE_INFO`` maps every AXI port to its
interface and logical signal, and one ``X_INTERFACE_PARAMETER`` per interface states what the
engine issues (:func:`interface_parameters`: protocol, widths, 16-beat bursts, bursts in flight),
so the interconnect sizes its AXI4 -> AXI3 conversion from the Verilog and not from defaults.
The clock's ``ASSOCIATED_BUSIF`` and the reset's ``POLARITY`` complete it, so a block design adds
the module as a module reference with no packaging step. The wrapper is generated from the
engine's signature, so it cannot drift from it; build.tcl reads the parameters Vivado inferred
back and stops if any differs (params.tcl carries :func:`interface_parameters`).
"""

from __future__ import annotations

from amaranth import Shape
from amaranth.back import verilog as amaranth_verilog
from amaranth.lib import wiring

from gpt_fpga.hw.axi import MAX_BURST_BEATS
from gpt_fpga.hw.axi_read import DEFAULT_MAX_OUTSTANDING

TOP_NAME = "gpt_fpga_engine"
CORE_NAME = "gpt_fpga_engine_core"
AXI_VLNV = "xilinx.com:interface:aximm:1.0"
# engine member -> (AXI interface of the wrapper, prefix of its ports)
BUS = {"s_axi": ("s_axi", "s_axi_"), "m_axi_r": ("m_axi", "m_axi_"), "m_axi_w": ("m_axi", "m_axi_"),
       "m_axi1_r": ("m_axi1", "m_axi1_")}
# DDR manager -> (its read member, its write member or None: read only)
MANAGERS = (("m_axi", "m_axi_r", "m_axi_w"), ("m_axi1", "m_axi1_r", None))


def bus_interfaces(engine) -> list[str]:
    """The AXI interfaces of the wrapper (the clock's ASSOCIATED_BUSIF)."""
    return ["s_axi", "m_axi"] + (["m_axi1"] if "m_axi1_r" in engine.signature.members else [])


def interface_parameters(engine) -> dict[str, dict[str, str | int]]:
    """{AXI interface: {parameter: value}}: what each interface is, from the engine's signature.

    Managers: AXI4, the signature's data, address and ID widths, bursts of at most
    ``MAX_BURST_BEATS`` (16: the HP ports are AXI3, so no burst is split), the DMAs'
    ``DEFAULT_MAX_OUTSTANDING`` bursts in flight (the engine builds its DMAs with that default),
    no narrow bursts; ``m_axi1`` only reads. The register port: AXI4-Lite at its widths.
    """
    members = engine.signature.members
    lite = members["s_axi"].signature
    params = {"s_axi": {"PROTOCOL": "AXI4LITE", "DATA_WIDTH": lite.data_bits, "ADDR_WIDTH": lite.addr_bits}}
    for busif, read, write in MANAGERS:
        if read not in members:
            continue
        r = members[read].signature
        if write is not None:
            w = members[write].signature
            if (w.data_bits, w.addr_bits, w.id_bits) != (r.data_bits, r.addr_bits, r.id_bits):
                raise ValueError(f"{busif}: the read and write halves differ in width ({read}: {r.data_bits}/"
                                 f"{r.addr_bits}/{r.id_bits}, {write}: {w.data_bits}/{w.addr_bits}/{w.id_bits})")
        p = {"PROTOCOL": "AXI4", "READ_WRITE_MODE": "READ_WRITE" if write else "READ_ONLY",
             "DATA_WIDTH": r.data_bits, "ADDR_WIDTH": r.addr_bits, "ID_WIDTH": r.id_bits,
             "MAX_BURST_LENGTH": MAX_BURST_BEATS, "NUM_READ_OUTSTANDING": DEFAULT_MAX_OUTSTANDING}
        if write is not None:
            p["NUM_WRITE_OUTSTANDING"] = DEFAULT_MAX_OUTSTANDING
        p["SUPPORTS_NARROW_BURST"] = 0
        params[busif] = p
    return params


def wrapper_ports(engine) -> list[tuple[str, str, str, int]]:
    """(wrapper port, core port, "input"|"output", width) for every member of the engine."""
    out = []
    for path, member in engine.signature.members.flatten():
        if member.is_signature:
            continue
        core = "__".join(str(p) for p in path)
        top = BUS[path[0]][1] + str(path[-1]) if len(path) > 1 else str(path[0])
        direction = "output" if member.flow == wiring.Out else "input"
        out.append((top, core, direction, Shape.cast(member.shape).width))
    return out


def _bus_of(port: str) -> str | None:
    """The AXI interface a wrapper port belongs to ("m_axi1_" is not "m_axi_" + something), or None."""
    return next((bus for bus, prefix in set(BUS.values()) if port.startswith(prefix)), None)


def _parameter_text(busif: str, params: dict) -> str:
    return ", ".join([f"XIL_INTERFACENAME {busif}"] + [f"{k} {v}" for k, v in params.items()])


def wrapper_verilog(engine) -> str:
    ports = wrapper_ports(engine)
    params = interface_parameters(engine)
    busif = ":".join(bus_interfaces(engine))
    decls = [['(* X_INTERFACE_INFO = "xilinx.com:signal:clock:1.0 aclk CLK" *)',
              f'(* X_INTERFACE_PARAMETER = "ASSOCIATED_BUSIF {busif}, ASSOCIATED_RESET aresetn" *)',
              "input wire aclk"],
             ['(* X_INTERFACE_INFO = "xilinx.com:signal:reset:1.0 aresetn RST" *)',
              '(* X_INTERFACE_PARAMETER = "POLARITY ACTIVE_LOW" *)',
              "input wire aresetn"]]
    annotated = set()
    for top, _, direction, width in ports:
        rng = f"[{width - 1}:0] " if width > 1 else ""
        attrs = []
        if top == "interrupt":
            attrs = ['(* X_INTERFACE_INFO = "xilinx.com:signal:interrupt:1.0 interrupt INTERRUPT" *)',
                     '(* X_INTERFACE_PARAMETER = "SENSITIVITY LEVEL_HIGH" *)']
        elif (bus := _bus_of(top)) is not None:
            attrs = [f'(* X_INTERFACE_INFO = "{AXI_VLNV} {bus} {top[len(bus) + 1:].upper()}" *)']
            if bus not in annotated:  # one port carries the interface's parameters (UG994)
                attrs.append(f'(* X_INTERFACE_PARAMETER = "{_parameter_text(bus, params[bus])}" *)')
                annotated.add(bus)
        decls.append(attrs + [f"{direction} wire {rng}{top}"])
    body = ",\n".join("\n".join("  " + line for line in d) for d in decls)
    conns = ["    .clk(aclk)", "    .rst(~aresetn)"] + [f"    .{core}({top})" for top, core, _, _ in ports]
    return (f"// Generated by gpt_fpga.hw.top from the engine's signature; do not edit.\n"
            f"module {TOP_NAME} (\n{body}\n);\n"
            f"  {CORE_NAME} core (\n" + ",\n".join(conns) + "\n  );\nendmodule\n")


def verilog(engine) -> str:
    """The engine core (Amaranth) and the wrapper, in one Verilog-2005 text."""
    core = amaranth_verilog.convert(engine, name=CORE_NAME, emit_src=False)
    return core + "\n" + wrapper_verilog(engine)
