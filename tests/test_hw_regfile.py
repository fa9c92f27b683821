"""Register file: generated from contract/registers.REGISTERS; cocotb against the table's semantics.

The fast tests (no simulator) check that docs/registers.md is the table's markdown, that the ports
follow the table, that lookups refuse unknown names, and the engine's field helpers.
"""

import subprocess
from pathlib import Path

import pytest
from amaranth import Module, Shape, Signal
from amaranth.lib.wiring import Flow
from amaranth.sim import Simulator

from gpt_fpga.hw.regfile import RegisterFile, field, lookup, pack
from gpt_fpga.contract import registers
from gpt_fpga.sim.tb.runner import BUILD, SIMULATORS, run_cocotb, simulator_cases, write_verilog

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(SIMULATORS))
def test_regfile(sim):
    dut = RegisterFile()
    run_cocotb("regfile", dut, "gpt_fpga.sim.tb.regfile", sim, tb_params={
        "write_cycles": dut.write_cycles, "read_cycles": dut.read_cycles,
        "write_latency": dut.write_latency, "read_latency": dut.read_latency})


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(["verilator"]))
def test_regfile_verilog_lints(sim):
    """The generated Verilog passes the lint of `make verilog` (hw/synth.py)."""
    from gpt_fpga.hw.toolchain import verilator_env

    path = write_verilog(RegisterFile(), "regfile", BUILD / "regfile" / "lint" / "regfile.v")
    with verilator_env():
        r = subprocess.run(["verilator", "--lint-only", "-Wno-WIDTH", "-Wno-CASEINCOMPLETE", "--top-module",
                            "regfile", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


# ---- fast: the table, the doc, the ports, the helpers

def test_doc_is_generated_from_the_table():
    doc = REPO / "docs" / "registers.md"
    assert doc.read_text() == registers.markdown(), (
        "docs/registers.md is stale: python -m gpt_fpga.contract.registers > docs/registers.md")


def test_ports_follow_the_table():
    members = RegisterFile().signature.members
    expected = {"s_axi"}
    for r in registers.REGISTERS:
        name = r.name.lower()
        expected.add(name)
        flow = Flow.In if r.access == "ro" else Flow.Out
        assert members[name].flow == flow and Shape.cast(members[name].shape).width == 32, r.name
        if r.access == "w1c":
            expected.add(f"{name}_set")
            assert members[f"{name}_set"].flow == Flow.In, r.name
    assert set(members.keys()) == expected
    assert members["s_axi"].flow == Flow.In
    assert Shape.cast(members["s_axi"].signature.members["awaddr"].shape).width == registers.ADDRESS_BITS


def test_lookups_refuse_unknown_names():
    with pytest.raises(KeyError):
        registers.register("NO_SUCH")
    with pytest.raises(KeyError, match="no field"):
        registers.register("STATUS").field("no_such")
    with pytest.raises(KeyError, match="no field"):
        registers.register("COMMAND").pack(no_such=1)
    with pytest.raises(KeyError, match="STATUS"):  # names the registers there are
        lookup("status")  # exact, upper case
    word = Signal(32)
    with pytest.raises(KeyError):
        field(word, "NO_SUCH", "busy")
    with pytest.raises(KeyError, match="no field"):
        field(word, "STATUS", "no_such")
    with pytest.raises(KeyError):
        pack("STATUS", no_such=1)


def test_field_slices_every_field():
    word = Signal(32)
    for r in registers.REGISTERS:
        for f in r.fields:
            s = field(word, r.name, f.name)
            assert (s.start, s.stop, len(s)) == (f.lsb, f.lsb + f.width, f.width), (r.name, f.name)
    with pytest.raises(ValueError, match="32-bit"):
        field(Signal(16), "STATUS", "busy")


def test_pack_places_fields():
    """pack() == Register.pack for constants and signals; too-wide values are refused."""
    cases = [("STATUS", dict(busy=1, error=1)), ("COMMAND", dict(op=1, layer=0xA5)),
             ("STEP", dict(step=len(registers.STEPS) - 1, head=7)),
             ("HW_CONFIG", dict(bus_bits=64, weights=1, group=32)), ("ID", dict(magic=registers.ENGINE_MAGIC)),
             ("STATUS", {})]
    m = Module()
    outs = []
    for name, values in cases:
        sigs = {k: Signal(registers.register(name).field(k).width, name=f"{name}_{k}") for k in values}
        o = Signal(32, name=f"{name}_word")
        m.d.comb += o.eq(pack(name, **sigs))
        outs.append((name, values, sigs, o, pack(name, **values)))
    sim = Simulator(m)

    async def bench(ctx):
        for name, values, sigs, o, const in outs:
            for k, v in values.items():
                ctx.set(sigs[k], v)
            want = registers.register(name).pack(**values)
            assert ctx.get(o) == want, name
            assert ctx.get(const) == want, name

    sim.add_testbench(bench)
    sim.run()
    with pytest.raises(ValueError, match="bits wide"):
        pack("STATUS", busy=Signal(2))
    with pytest.raises(ValueError):
        pack("STATUS", busy=2)


def test_rejects_bad_tables():
    R, F = registers.Register, registers.Field
    ok = R("A", 0x0, "rw", "", (F("x", 0, 8, ""),))
    RegisterFile((ok, R("B", 0x4, "w1c", "", (F("y", 0, 1, ""),))), addr_bits=3)  # a small one builds
    bad = [
        ((ok, R("B", 0x0, "rw", "", ())), "taken twice"),
        ((ok, R("B", 0x6, "rw", "", ())), "word offset"),
        ((ok, R("B", 0x80, "rw", "", ())), "word offset"),
        ((ok, R("B", 0x4, "wo", "", ())), "access"),
        ((ok, R("a", 0x4, "rw", "", ())), "port name"),
        ((R("A_SET", 0x0, "rw", "", ()), R("A", 0x4, "w1c", "", ())), "port name"),
        ((R("S_AXI", 0x0, "rw", "", ()),), "port name"),
        ((R("A B", 0x0, "rw", "", ()),), "port name"),
        ((), "at least one"),
    ]
    for regs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            RegisterFile(regs)
    with pytest.raises(ValueError, match="addr_bits"):
        RegisterFile(addr_bits=2)
    with pytest.raises(TypeError):
        RegisterFile(("A",))
