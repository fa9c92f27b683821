"""The engine's Vivado wrapper (hw/top.py): the AXI facts written into the Verilog for IP integrator.

The wrapper's X_INTERFACE_PARAMETER attributes are parsed back from the generated text and compared
with the engine itself: the widths of its signature's members and the bursts in flight of the DMAs it
elaborates (not with top.py's own table), for the one-port 64-bit, one-port 128-bit and two-port
128-bit engines. Every AXI port is mapped to its interface by X_INTERFACE_INFO (UG994: the attribute
that decides inference), and each interface's parameters sit on one of its ports.
"""

from __future__ import annotations

import re

import pytest

from gpt_fpga.hw.engine import Engine
from gpt_fpga.hw.top import TOP_NAME, wrapper_ports, wrapper_verilog

AXI4_BURST_LIMIT_HP = 16  # the Zynq-7000 HP ports are AXI3: 16 beats at most per burst (UG585)
PORT = re.compile(r"((?:\(\* [^\n]*\*\)\n\s*)*)(input|output) wire (?:\[(\d+):0\] )?(\w+)")
ATTR = re.compile(r'\(\* (X_INTERFACE_\w+) = "([^"]*)" \*\)')


def ports_with_attributes(text: str) -> dict[str, dict[str, str]]:
    """{port: {attribute: value}} of the wrapper module's port list."""
    body = re.search(rf"module {TOP_NAME} \((.*?)\n\);", text, re.S).group(1)
    return {m.group(4): dict(ATTR.findall(m.group(1))) for m in PORT.finditer(body)}


def interface_parameters_in(text: str) -> dict[str, dict[str, str]]:
    """{interface: {parameter: value}} from the XIL_INTERFACENAME parameter attributes."""
    out = {}
    for attrs in ports_with_attributes(text).values():
        value = attrs.get("X_INTERFACE_PARAMETER", "")
        if value.startswith("XIL_INTERFACENAME "):
            items = [item.strip().split(" ", 1) for item in value.split(",")]
            busif = items[0][1]
            assert busif not in out, f"{busif}: parameters given twice"
            out[busif] = dict(items[1:])
    return out


def elaborated_submodules(engine):
    """The submodules of one elaboration of `engine` (only read, never built: Amaranth's "created but
    never used" warning is silenced for them, as a build would)."""
    m = engine.elaborate(None)
    for obj in [m] + [entry[0] if isinstance(entry, tuple) else entry
                      for entry in [*m._named_submodules.values(), *m._anon_submodules]]:
        while obj is not None:  # a ResetInserter(core) wraps the core: both are silenced
            obj._MustUse__silence = True
            obj = obj.__dict__.get("_elaboratable_")
    return m.submodules


ENGINES = {"64-bit, 1 port": dict(), "128-bit, 1 port": dict(bus_bits=128),
           "128-bit, 2 ports": dict(bus_bits=128, ports=2)}


@pytest.mark.parametrize("kw", ENGINES.values(), ids=ENGINES.keys())
def test_interface_parameters_are_the_engines_own(kw):
    engine = Engine(weights="int4", group=32, **kw)
    text = wrapper_verilog(engine)
    params = interface_parameters_in(text)
    dmas = elaborated_submodules(engine)  # the DMAs the engine builds: their bursts in flight
    in_flight = str(dmas.rd.max_outstanding)

    managers = {"m_axi": (engine.m_axi_r, engine.m_axi_w)}
    if kw.get("ports") == 2:
        managers["m_axi1"] = (engine.m_axi1_r, None)
    assert set(params) == {"s_axi"} | set(managers)
    for busif, (read, write) in managers.items():
        want = {"PROTOCOL": "AXI4", "READ_WRITE_MODE": "READ_WRITE" if write is not None else "READ_ONLY",
                "DATA_WIDTH": str(len(read.rdata)), "ADDR_WIDTH": str(len(read.araddr)), "ID_WIDTH": str(len(read.arid)),
                "MAX_BURST_LENGTH": str(AXI4_BURST_LIMIT_HP), "NUM_READ_OUTSTANDING": in_flight,
                "SUPPORTS_NARROW_BURST": "0"}
        if write is not None:
            assert (len(write.wdata), len(write.awaddr), len(write.awid)) == (len(read.rdata), len(read.araddr),
                                                                            len(read.arid))
            want["NUM_WRITE_OUTSTANDING"] = str(dmas.wr.max_outstanding)
        assert params[busif] == want, busif
    bus = kw.get("bus_bits", 64) // kw.get("ports", 1)
    assert params["m_axi"]["DATA_WIDTH"] == str(bus)
    assert params["s_axi"] == {"PROTOCOL": "AXI4LITE", "DATA_WIDTH": str(len(engine.s_axi.rdata)),
                               "ADDR_WIDTH": str(len(engine.s_axi.araddr))}


@pytest.mark.parametrize("kw", ENGINES.values(), ids=ENGINES.keys())
def test_every_axi_port_is_mapped_to_its_interface(kw):
    engine = Engine(weights="int8", **kw)
    ports = ports_with_attributes(wrapper_verilog(engine))
    assert set(ports) == {"aclk", "aresetn"} | {top for top, _, _, _ in wrapper_ports(engine)}
    for port, attrs in ports.items():
        busif = re.match(r"(s_axi|m_axi1|m_axi)_(\w+)$", port)
        if busif is None:
            continue
        assert attrs["X_INTERFACE_INFO"] == f"xilinx.com:interface:aximm:1.0 {busif[1]} {busif[2].upper()}", port
    assert ports["interrupt"] == {"X_INTERFACE_INFO": "xilinx.com:signal:interrupt:1.0 interrupt INTERRUPT",
                                  "X_INTERFACE_PARAMETER": "SENSITIVITY LEVEL_HIGH"}
    assert ports["aresetn"]["X_INTERFACE_PARAMETER"] == "POLARITY ACTIVE_LOW"
