"""The pure parts of the engine roofline benchmark (bench/engine.py): the record of a run, the
roofline arithmetic, the PYNQ-Z2 projection, the goals, the STEP breakdown, the analysis, the plot,
and the instant device that times the host's own work. No RTL simulation here (make bench runs it).

Expected numbers are worked out by hand in the comments next to them.
"""

from __future__ import annotations

import pytest

from gpt_fpga.bench import engine as eb

REQUIRED = {"model", "weights", "position", "ports", "bus_bits", "bytes", "cycles", "beats_per_cycle",
            "roofline_fraction", "ddr_fraction", "tok_s"}

# a made-up token: one LAYER and the HEAD
COMMANDS = [{"name": "LAYER 0", "cycles": 1000, "beats_read": 900, "beats_written": 50},
            {"name": "HEAD", "cycles": 3000, "beats_read": 2800, "beats_written": 100}]


def test_record_shape_and_roofline_arithmetic():
    r = eb.run_record("tinystories-33m", "int8", 7, COMMANDS, bus_bytes=8)
    assert REQUIRED <= set(r)
    assert set(r["tok_s"]) == {"100mhz", "142.857mhz", "pynq_z2"}
    assert (r["model"], r["weights"], r["position"]) == ("tinystories-33m", "int8", 7)
    # cycles 1000 + 3000; beats 900 + 50 + 2800 + 100 = 3850, x 8 bytes
    assert r["cycles"] == 4000
    assert r["bytes"] == 30800
    assert r["beats_per_cycle"] == pytest.approx(0.9625)  # 3850 / 4000
    assert r["roofline_fraction"] == pytest.approx(0.9625)  # 30800 / (8 x 4000)
    assert r["tok_s"]["100mhz"] == pytest.approx(25000.0)  # 100e6 / 4000
    assert r["tok_s"]["142.857mhz"] == pytest.approx(35714.2857142857)  # (1e9 / 7) / 4000
    # DDR: 1.785e9 / 30800 = 57954.5 tok/s, above the engine's 35714.3: the engine binds
    assert r["tok_s"]["pynq_z2"] == pytest.approx(35714.2857142857)
    assert r["pynq_z2_binding"] == "engine cycles"
    # roofline at 142.857 MHz: 1e9 / 7 x 8 / 30800 = 1.142857e9 / 30800 = 37105.75 tok/s
    assert r["roofline_tok_s_142.857mhz"] == pytest.approx(37105.7513914657)
    # reads only: 3700 beats at 8 B/cycle -> 3700 cycles of stream, 300 of overhead
    assert r["stream_cycles"] == pytest.approx(3700)
    assert r["overhead_cycles"] == pytest.approx(300)
    # (30800 B / 1.785e9 B/s) / (4000 / 142.857e6 s) = 17.2549e-6 / 28e-6 = 0.61625
    assert (r["ports"], r["bus_bits"]) == (1, 64)
    assert r["ddr_fraction"] == pytest.approx(0.6162464986)
    assert [c["name"] for c in r["commands"]] == ["LAYER 0", "HEAD"]


def test_record_with_a_ddr_slower_than_the_bus():
    # 128-bit bus, DDR 12.5 B/cycle: 3700 read beats x 16 B / 12.5 = 4736 stream cycles
    r = eb.run_record("tinystories-33m", "int4", 0, COMMANDS, bus_bytes=16, ddr_bytes_per_cycle=12.5, ports=2)
    assert r["bytes"] == 61600  # 3850 x 16
    assert (r["ports"], r["bus_bits"]) == (2, 128)
    assert r["ddr_fraction"] == pytest.approx(1.2324929972)  # twice the 64-bit case: more than the DDR gives
    assert r["roofline_fraction"] == pytest.approx(0.9625)  # 61600 / (16 x 4000)
    assert r["stream_cycles"] == pytest.approx(4736)
    assert r["overhead_cycles"] == pytest.approx(-736)


def test_pynq_z2_projection():
    assert eb.PYNQ_DDR_USABLE == pytest.approx(1.785e9)  # 2.1e9 x 0.85
    # engine-bound: 142.857142857e6 / 10e6 cycles = 14.2857 tok/s; DDR 1.785e9 / 80e6 B = 22.3125
    assert eb.pynq_z2_tok_s(10_000_000, 80_000_000) == pytest.approx(14.2857142857)
    assert eb.pynq_z2_binding(10_000_000, 80_000_000) == "engine cycles"
    # DDR-bound: 142.857 tok/s from the cycles, but 1.785e9 / 20e6 B = 89.25
    assert eb.pynq_z2_tok_s(1_000_000, 20_000_000) == pytest.approx(89.25)
    assert eb.pynq_z2_binding(1_000_000, 20_000_000) == "DDR bandwidth"
    # the measured TinyStories-33M int8 token at position 0: 1e9 / 7 / 8491632 = 16.8233 (DDR: 26.3155)
    assert eb.pynq_z2_tok_s(8_491_632, 67_830_816) == pytest.approx(16.8232847181)
    # a full-rate 64-bit port at 142.857 MHz is 1.142857 GB/s: 68 MB per token -> 16.8067 tok/s
    assert eb.roofline_tok_s(1e9 / 7, 8, 68_000_000) == pytest.approx(16.8067226891)
    # 20 tok/s x 68 MB at a 0.85 roofline fraction: 1.6 GB/s on the bus
    assert eb.bytes_needed_for(20, 68_000_000, 0.85) == pytest.approx(1.6e9)


def _run(model, weights, position, cycles, beats_read, bus_bytes=8, ddr=None, ports=1):
    head = {"name": "HEAD", "cycles": cycles // 2, "beats_read": beats_read // 2, "beats_written": 0}
    layer = {"name": "LAYER 0", "cycles": cycles - cycles // 2, "beats_read": beats_read - beats_read // 2,
             "beats_written": 0}
    return eb.run_record(model, weights, position, [layer, head], bus_bytes, ddr, ports)


def test_goals_pass_and_fail():
    # two ports, 16-byte beats: ddr_fraction = beats x 16 x 142.857e6 / (cycles x 1.785e9) = 1.28051 x beats / cycles
    runs = [_run("tinystories-33m", "int8", 0, 5_000_000, 3_800_000, 16, 12.495, 2),  # 0.97319, 28.57 tok/s
            _run("tinystories-33m", "int8", 2047, 6_000_000, 4_000_000, 16, 12.495, 2),  # 0.85367, 23.8
            _run("tinystories-33m", "int4", 0, 3_200_000, 2_400_000, 16, 12.495, 2),  # 0.96038, 44.64 tok/s
            _run("gpt2-124m", "int4", 0, 1_000_000, 750_000, 16, 12.495, 2)]  # 0.96038
    one = [_run("tinystories-33m", "int8", 0, 8_000_000, 7_900_000),  # roofline 0.9875
           _run("tinystories-33m", "int4", 0, 3_000_000, 2_000_000)]  # 0.667
    goals = eb.evaluate_goals(runs, one)
    ddr = [g for g in goals if g["goal"].startswith("ddr_fraction")]
    tok = [g for g in goals if g["goal"].startswith("pynq_z2")]
    frac = [g for g in goals if g["goal"].startswith("one port")]
    assert [g["pass"] for g in ddr] == [True, False, True, True]
    assert ddr[1]["value"] == pytest.approx(0.8536748), ddr[1]  # 64e6 B / 1.785e9 over 6e6 / 142.857e6
    # position 0 only: 1e9 / 7 / 5e6 = 28.57 >= 24; 1e9 / 7 / 3.2e6 = 44.64 < 46
    assert [(g["model"], g["weights"], g["position"], g["pass"]) for g in tok] == [
        ("tinystories-33m", "int8", 0, True), ("tinystories-33m", "int4", 0, False)]
    assert tok[1]["value"] == pytest.approx(44.6428571429)
    assert tok[0]["target"] == 24.0 and tok[1]["target"] == 46.0
    assert [g["pass"] for g in frac] == [True, False] and all(g["ports"] == 1 for g in frac)


def test_step_breakdown_sums_per_step_in_order():
    samples = [("ln1", 100, 30, 0), ("qkv", 500, 495, 0), ("scores_softmax", 40, 10, 0), ("qkv", 10, 12, 0),
               ("store_residual", 20, 0, 25)]
    steps = eb.step_breakdown(samples)
    assert [s["step"] for s in steps] == ["ln1", "qkv", "scores_softmax", "store_residual"]
    assert steps[1] == {"step": "qkv", "cycles": 510, "beats_read": 507, "beats_written": 0, "idle_cycles": 3}
    assert steps[0]["idle_cycles"] == 70
    assert steps[3]["idle_cycles"] == 0  # more beats than cycles (R and W run together): floor 0


def _result():
    runs = [_run("tinystories-33m", "int8", 0, 5_400_000, 4_200_000, 16, 12.495, 2),
            _run("tinystories-33m", "int4", 0, 2_950_000, 2_290_000, 16, 12.495, 2),
            _run("gpt2-124m", "int4", 1023, 7_000_000, 5_300_000, 16, 12.495, 2)]
    one = [_run("tinystories-33m", "int8", 0, 8_500_000, 8_450_000),
           _run("tinystories-33m", "int4", 0, 4_570_000, 4_560_000)]
    steps = eb.step_breakdown([("fetch_descriptor", 569, 66, 0), ("ln1", 2389, 768, 0), ("qkv", 223589, 223488, 50),
                               ("scores_softmax", 30299, 192, 0), ("store_residual", 1165, 0, 384)])
    profiles = [{"model": r["model"], "weights": r["weights"], "bus_bits": r["bus_bits"], "ports": r["ports"],
                 "position": r["position"], "command": "LAYER 0", "steps": steps} for r in runs + one]
    return {"runs": runs, "one_port": {"runs": one}, "step_profile": profiles}


def test_analysis_names_speedup_and_serial_steps():
    a = eb.analysis(_result())
    assert a["text"] and all(isinstance(t, str) for t in a["text"])
    sp = {(s["model"], s["weights"]): s for s in a["speedup_over_one_port"]}
    # 8.5e6 / 5.4e6 cycles = x1.574; no one-port run for gpt2-124m
    assert sp[("tinystories-33m", "int8")]["speedup"] == pytest.approx(8.5 / 5.4)
    assert ("gpt2-124m", "int4") not in sp
    # the DDR model moves 12.495 B/cycle: a 16-byte beat needs 16 / 12.495 = 1.28051 cycles.
    # TinyStories, 4 layers: scores_softmax 30299 - 192 x 1.28051 = 30053.1 serial cycles per layer,
    # x 4 / 5.4e6 = 2.23 %; ln1 2389 - 768 x 1.28051 = 1405.6: 0.10 %; qkv moves more than the DDR rate: 0
    over = a["serial_steps"]["tinystories-33m int8 @ 0"]["over_limit"]
    assert [b["step"] for b in over] == ["scores_softmax"]
    assert over[0]["share_of_token"] == pytest.approx((30299 - 192 * 16 / 12.495) * 4 / 5.4e6)
    # GPT-2: 12 layers over 7e6 cycles: scores_softmax 5.15 %, ln1 0.24 %, store_residual 0.12 %
    assert [b["step"] for b in a["serial_steps"]["gpt2-124m int4 @ 1023"]["over_limit"]] == ["scores_softmax"]
    assert "DDR" in a["binding_limit_pynq_z2"]


def test_plot_is_written(tmp_path):
    res = _result()
    path = tmp_path / "engine.png"
    eb.plot_engine(res, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    del res["one_port"]  # two-port bars and the roofline only
    eb.plot_engine(res, tmp_path / "two.png")
    assert (tmp_path / "two.png").stat().st_size > 10_000


def test_instant_device_times_the_driver(tmp_path):
    """The host-cost stand-in runs the real driver: 1 POSITION write per token, then per command
    COMMAND, CONTROL and IRQ_STATUS writes and STATUS, CYCLES, BEATS_READ, BEATS_WRITTEN reads."""
    from gpt_fpga.quantize.quantizer import quantize_checkpoint
    from gpt_fpga.contract import numerics as nx
    from gpt_fpga.contract import registers as rm
    from gpt_fpga.contract.image import FORMAT_VERSION
    from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint

    cfg = make_config("gpt2", vocab=64, d=32, heads=2, layers=2, n_ctx=16)
    write_checkpoint(tmp_path / "m", cfg, random_tensors(cfg, seed=1))
    img = tmp_path / "m.img"
    quantize_checkpoint(tmp_path / "m", img, weights="int4", group=32, calib_tokens=16, progress=False)
    R = rm.register
    ident = {R("ID").offset: rm.ENGINE_MAGIC,
             R("VERSION").offset: R("VERSION").pack(contract=nx.CONTRACT_VERSION, image_format=FORMAT_VERSION,
                                                    regmap=rm.REGMAP_VERSION),
             R("HW_CONFIG").offset: R("HW_CONFIG").pack(bus_bits=64, weights=rm.WEIGHT_CODES["int4"], group=32,
                                                                            ports=1),
             R("MAX_D_IN").offset: 4096, R("MAX_CONTEXT").offset: 2048, R("MAX_HEAD_DIM").offset: 256}
    h = eb.host_cost(img, ident, tokens=4)
    commands = 2 + 1  # two LAYERs and the HEAD
    assert h["register_writes_per_token"] == 1 + 3 * commands
    assert h["register_reads_per_token"] == 4 * commands
    assert h["host_ms_per_token"] == pytest.approx(h["driver_step_ms"] + h["logits_argmax_ms"] + h["top_k_sample_ms"])
    assert 0 < h["driver_step_ms"] < 1000
