"""The two-port engine in Verilator (host/rtl_device.py, PORTS=2): READ_PORTS and board-check's
per-port bandwidth rows.

A weight-bound HEAD (vocab 2048 x d 64 at int8: 8192 bus beats) through port 0 alone, port 1 alone
and both, with the DDR model at the PYNQ-Z2's usable 12.495 bytes per cycle and port 1 answering
later than port 0: the logits equal the fixed model's each time; one port alone carries at most one
64-bit beat per cycle; both together carry more than either, up to the DDR model's cap.
"""

from __future__ import annotations

import re

import pytest

from gpt_fpga.contract import registers as rm
from gpt_fpga.sim.tb.runner import simulator_cases

pytestmark = pytest.mark.sim
VERILATOR = simulator_cases(["verilator"])
CLOCK_HZ = 1e9 / 7
ENGINE_KW = dict(max_d=256, max_context=64, max_head_dim=64, max_heads=8)


@pytest.fixture(scope="module")
def two_port(tmp_path_factory):
    from gpt_fpga.contract.image import read_image
    from gpt_fpga.host.driver import Driver
    from gpt_fpga.host.rtl_device import RtlDevice
    from gpt_fpga.quantize.quantizer import quantize_checkpoint
    from gpt_fpga.sim.fixed_model import FixedModel
    from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint

    out = tmp_path_factory.mktemp("two-port")
    cfg = make_config("gpt2", vocab=2048, d=64, heads=2, layers=1, n_ctx=16, d_ff=128)
    write_checkpoint(out / "m", cfg, random_tensors(cfg, seed=5))
    img = out / "m.img"
    quantize_checkpoint(out / "m", img, weights="int8", group=32, bus_bits=128, calib_tokens=16, progress=False)
    image = read_image(img)
    dev = RtlDevice(weights="int8", bus_bits=128, clock_hz=CLOCK_HZ, **ENGINE_KW)
    dev.configure_port(1, read_latency=120)
    yield dev, Driver(image, dev), FixedModel(image)
    dev.close()


def _gbs(row) -> float:
    return float(re.match(r"([0-9.]+) GB/s", row.detail).group(1))


@pytest.mark.parametrize("sim", VERILATOR)
def test_each_port_alone_and_both(sim, two_port):
    from gpt_fpga.host import board_check as bc

    dev, driver, model = two_port
    assert dev.ports == 2 and dev.ddr["bytes_per_cycle"] == pytest.approx(12.495)
    mhz = CLOCK_HZ / 1e6
    rows = bc._port_rows(dev, driver, model, 3, 16, mhz)  # HEAD through port 0 alone, then port 1 alone
    assert [(r.check, r.result) for r in rows] == [("read bandwidth, port 0 alone", "info"),
                                                   ("read bandwidth, port 1 alone", "info")], rows
    per_port = {r.check: r for r in rows}
    assert dev.read_reg(rm.register("READ_PORTS").offset) == 0, "READ_PORTS is restored"
    alone = {name: _gbs(per_port[f"read bandwidth, {name}"]) for name in bc.READ_PORTS_ONLY}
    one_port_gbs = 8 * CLOCK_HZ / 1e9  # 1.143
    for name, gbs in alone.items():
        assert 0.8 * one_port_gbs < gbs <= one_port_gbs * 1.001, (name, gbs)

    dev.clear_stats()
    row, stats = bc._dma_check(driver, model, 3)
    assert row.result == "ok", row
    s = dev.stats()
    assert 0.4 * s["read_beats"] < s["port1_read_beats"] < 0.6 * s["read_beats"], s  # split over both ports
    both = _gbs(bc._bandwidth_row(stats, 16, mhz))
    assert both > 1.3 * max(alone.values()), (both, alone)
    assert both <= 12.495 * CLOCK_HZ / 1e9 * 1.001, both  # the DDR model's cap


@pytest.mark.parametrize("sim", VERILATOR)
@pytest.mark.parametrize("only, port1_share", [(1, 0.0), (2, 1.0)])
def test_read_ports_routes_every_burst(sim, two_port, only, port1_share):
    from gpt_fpga.host import board_check as bc

    dev, driver, model = two_port
    reg = rm.register("READ_PORTS")
    dev.write_reg(reg.offset, reg.pack(only=only))
    try:
        dev.clear_stats()
        row, _ = bc._dma_check(driver, model, 5)
        assert row.result == "ok", row
        s = dev.stats()
        assert s["read_beats"] > 0 and s["port1_read_beats"] == port1_share * s["read_beats"], s
    finally:
        dev.write_reg(reg.offset, reg.pack(only=0))
