"""`make bitstream`: the PYNQ-Z2 overlay (gpt_fpga.bit + gpt_fpga.hwh) through Vivado in batch mode.

``python -m gpt_fpga.hw.bitstream [--weights int8|int4] [--group 32|64|128] [--ports 1|2] [--clock-mhz MHZ]
[--strategy auto|default|NAME]``

1. checks the request (weights, group, DDR ports; FCLK0 must be a frequency the 1000 MHz IO PLL
   makes: 100, 125, 142.857, 166.67 or 200 MHz). Two ports (HP0 and HP2, 64 bits each) feed the
   engine's 128-bit datapath; one port (HP0) feeds a 64-bit engine;
2. writes everything Vivado needs into ``build/overlay/`` (``--out``): the engine's Verilog
   (``hw/synth.py::engine_verilog``, top ``gpt_fpga_engine``), ``build.tcl`` and ``pynq_z2_ps7.tcl``
   (copies of ``hw/vivado/``), ``params.tcl`` (this build's parameters) and ``gpt_fpga.json`` (the
   engine's identity, clock, register base and git commit, for the board side to check); older
   ``gpt_fpga.bit`` / ``.hwh`` there are removed, so they can never disagree with the new json;
3. runs ``vivado -mode batch -source build.tcl -tclargs params.tcl`` in that folder (see build.tcl
   for the flow), and on success adds to the json (the build report) Vivado's version, the clock it
   made, the implementation strategy, the slack and pulse-width margins, and every CRITICAL WARNING
   in Vivado's logs.

The implementation strategy: ``auto`` (default) takes :data:`PERFORMANCE_STRATEGY` at
:data:`PERFORMANCE_FROM_MHZ` and above (as FINN's Zynq flow does; PYNQ's base overlays use a
performance strategy too) and Vivado's defaults below; ``default`` is Vivado's defaults; any other
name is passed to Vivado, which build.tcl checks against the strategies that Vivado offers.

Without ``vivado`` on PATH, step 3 is replaced by a one-line error (exit 2) that says which Vivado
to install and where the inputs are: the folder can be copied to a Vivado machine as it is.
A Vivado failure (including negative slack) exits 1 and names the log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from gpt_fpga.contract.layout import DEFAULT_GROUP

REPO = Path(__file__).resolve().parent.parent
VIVADO_DIR = Path(__file__).resolve().parent / "vivado"
PROG = "python -m gpt_fpga.hw.bitstream"

PART = "xc7z020clg400-1"
BOARD = "pynq-z2"
OUT_NAME = "gpt_fpga"          # gpt_fpga.bit, gpt_fpga.hwh, gpt_fpga.json: one basename (pynq.Overlay)
BD_NAME = "gpt_fpga"           # the block design; its .hwh is <bd>.hwh
PROJECT_NAME = "gpt_fpga_overlay"
PROJECT_DIR = "vivado"         # under the output folder
ENGINE_CELL = "engine"         # the engine's name in the block design (and in pynq's ip_dict)
VERILOG_NAME = "gpt_fpga_engine.v"
TCL_FILES = ("build.tcl", "pynq_z2_ps7.tcl")
PARAMS_NAME = "params.tcl"
RESULT_NAME = "vivado_result.json"

# The engine's registers on M_AXI_GP0 (0x4000_0000 .. 0x7FFF_FFFF on the Zynq-7000); 64 KiB, the
# smallest page pynq maps and the range PYNQ's own overlays give AXI4-Lite peripherals.
REG_BASE = 0x4000_0000
REG_RANGE = 64 * 1024
# What the engine may address through each HP port: all of the PYNQ-Z2's 512 MB of DDR, since
# pynq.allocate (CMA) can place a buffer anywhere in it.
DDR_BASE = 0x0000_0000
DDR_RANGE = 512 * 1024 * 1024

# The axi_intc PYNQ 3.x needs to see the engine's interrupt, on GP0 where PYNQ's base overlays put
# theirs (0x4180_0000); the engine's interrupt is its input 0.
INTC_CELL = "axi_intc"
INTC_BASE = 0x4180_0000
INTC_RANGE = 64 * 1024

IO_PLL_MHZ = 1000.0
# FCLK0 = IO PLL / n. These five are the ones offered (n = 10, 8, 7, 6, 5); 150 MHz cannot be made.
CLOCK_DIVISORS = (10, 8, 7, 6, 5)
CLOCKS_TEXT = "100, 125, 142.857, 166.67, 200"
VIVADO_VERSIONS = "2022.1 for PYNQ 3.0 images, 2024.1 for PYNQ 3.1"
PORT_CHOICES = (1, 2)
# engine master -> (PS7 HP port, its DDR segment): HP0/HP1 share one DDR-controller port and HP2/HP3
# another, so the second master goes to HP2
HP_PORTS = (("m_axi", "S_AXI_HP0", "HP0_DDR_LOWOCM"), ("m_axi1", "S_AXI_HP2", "HP2_DDR_LOWOCM"))
DEFAULT_PORTS = 2  # the PYNQ-Z2's DDR gives more than one 64-bit HP port carries
DEFAULT_CLOCK_MHZ = "142.857"  # IO PLL 1000 MHz / 7
DEFAULT_STRATEGY = "auto"
PERFORMANCE_STRATEGY = "Performance_ExtraTimingOpt"
DEFAULT_VIVADO_STRATEGY = "Vivado Implementation Defaults"
PERFORMANCE_FROM_MHZ = 125.0
CRITICAL = "CRITICAL WARNING:"


class BitstreamError(Exception):
    """A one-line reason; ``code`` is the exit status (2: bad request or tool missing, 1: build failed)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def fclk0_divisor(clock_mhz: float) -> int:
    """The IO PLL divisor that makes `clock_mhz` (within 0.01 MHz), or BitstreamError."""
    for n in CLOCK_DIVISORS:
        if abs(clock_mhz - IO_PLL_MHZ / n) <= 0.01:
            return n
    raise BitstreamError(f"CLOCK_MHZ={clock_mhz:g} cannot be made: FCLK0 is the {IO_PLL_MHZ:g} MHz IO PLL divided by "
                         f"an integer; use one of {CLOCKS_TEXT}")


def parse_clock(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BitstreamError(f"CLOCK_MHZ={text!r} is not a number; use one of {CLOCKS_TEXT}") from None
    fclk0_divisor(value)
    return value


def impl_strategy(name: str, clock_mhz: float) -> str:
    """The Vivado implementation strategy for `name` (auto, default or a Vivado strategy name)."""
    if name == "auto":
        return PERFORMANCE_STRATEGY if clock_mhz >= PERFORMANCE_FROM_MHZ - 0.01 else DEFAULT_VIVADO_STRATEGY
    if name == "default":
        return DEFAULT_VIVADO_STRATEGY
    if not re.fullmatch(r"[A-Za-z0-9_]+( [A-Za-z0-9_]+)*", name):
        raise BitstreamError(f"STRATEGY={name!r} is not a strategy name; use auto, default or a Vivado implementation "
                             f"strategy such as {PERFORMANCE_STRATEGY}")
    return name


def make_engine(weights: str, group: int, ports: int = DEFAULT_PORTS):
    """The engine object the Verilog is made from (its identity goes into the json): a 128-bit
    datapath on two 64-bit ports, or a 64-bit engine on one."""
    from gpt_fpga.hw.engine import Engine

    if ports not in PORT_CHOICES:
        raise BitstreamError(f"PORTS={ports!r}: the overlay has 1 (HP0) or 2 (HP0 + HP2) DDR ports")
    try:
        engine = Engine(weights=weights, group=group, bus_bits=128, ports=2) if ports == 2 else \
            Engine(weights=weights, group=group)
    except ValueError as e:
        raise BitstreamError(f"{e} (WEIGHTS is int8 or int4, GROUP 32, 64 or 128)") from None
    return engine


def git_state() -> dict:
    def git(*args):
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or "unknown", "dirty": bool(status) if status is not None else None}


def identity(engine, clock_mhz: float) -> dict:
    """gpt_fpga.json: what the board side checks before it trusts the overlay."""
    from gpt_fpga.hw.top import TOP_NAME
    from gpt_fpga.contract import numerics as nx
    from gpt_fpga.contract import registers as rm
    from gpt_fpga.contract.image import FORMAT_VERSION

    n = fclk0_divisor(clock_mhz)
    return {
        "overlay": OUT_NAME, "board": BOARD, "part": PART,
        "bitstream": f"{OUT_NAME}.bit", "hwh": f"{OUT_NAME}.hwh",
        "engine": {
            "top": TOP_NAME, "ip_name": ENGINE_CELL,
            "weights": engine.weights, "group": engine.group if engine.weights == "int4" else None,
            "bus_bits": engine.bus_bits, "ports": getattr(engine, "ports", 1), "max_d": engine.max_d, "max_context": engine.max_context,
            "max_head_dim": engine.max_head_dim, "max_heads": engine.max_heads,
            "identity_registers": engine.identity(),
        },
        "versions": {"contract": nx.CONTRACT_VERSION, "image_format": FORMAT_VERSION, "regmap": rm.REGMAP_VERSION},
        "clock": {"fclk0_mhz": round(IO_PLL_MHZ / n, 6), "requested_mhz": clock_mhz, "source": "FCLK0",
                  "io_pll_mhz": IO_PLL_MHZ, "divisor": n},
        "registers": {"base": REG_BASE, "base_hex": f"0x{REG_BASE:08X}", "range": REG_RANGE, "port": "M_AXI_GP0"},
        "ddr": {"base": DDR_BASE, "range": DDR_RANGE,
                "ports": [{"master": m, "port": hp, "segment": seg} for m, hp, seg in HP_PORTS[:getattr(engine, "ports", 1)]]},
        "interrupt": {"controller": INTC_CELL, "input": 0, "base": INTC_BASE, "base_hex": f"0x{INTC_BASE:08X}",
                      "range": INTC_RANGE, "irq": "IRQ_F2P[0]", "pin": f"{ENGINE_CELL}/interrupt"},
        "git": git_state(),
        "vivado": None,
        "generated_by": PROG,
    }


def _tcl_word(value) -> str:
    if isinstance(value, dict):  # a Tcl dict: {key value ...}
        return "{" + " ".join(f"{_tcl_word(k)} {_tcl_word(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_.:+/-]+", text):
        return text
    if any(c in text for c in "{}\\\n"):
        raise BitstreamError(f"cannot pass {text!r} to Tcl: braces, backslashes and newlines are not allowed")
    return "{" + text + "}"


def params_tcl(engine, clock_mhz: float, jobs: int, strategy: str = DEFAULT_STRATEGY) -> str:
    from gpt_fpga.hw.top import TOP_NAME, interface_parameters

    desc = f"{engine.weights}" + (f" group {engine.group}" if engine.weights == "int4" else "") + \
        f", {engine.bus_bits}-bit datapath, max_d {engine.max_d}, max_context {engine.max_context}"
    values = {
        "part": PART,
        "top": TOP_NAME,
        "verilog": VERILOG_NAME,
        "ps7_config": "pynq_z2_ps7.tcl",
        "project_dir": PROJECT_DIR,
        "project_name": PROJECT_NAME,
        "bd_name": BD_NAME,
        "engine_cell": ENGINE_CELL,
        "engine_desc": desc,
        "out_name": OUT_NAME,
        "clock_mhz": f"{clock_mhz:g}",
        "reg_base": f"0x{REG_BASE:08X}",
        "reg_range": f"{REG_RANGE // 1024}K",
        "ddr_base": f"0x{DDR_BASE:08X}",
        "ddr_range": f"{DDR_RANGE // (1024 * 1024)}M",
        "ports": getattr(engine, "ports", 1),
        "interfaces": interface_parameters(engine),  # what Vivado must infer from the Verilog
        "intc_cell": INTC_CELL,
        "intc_base": f"0x{INTC_BASE:08X}",
        "intc_range": f"{INTC_RANGE // 1024}K",
        "io_pll_mhz": f"{IO_PLL_MHZ:g}",
        "impl_strategy": impl_strategy(strategy, clock_mhz),
        "jobs": jobs,
    }
    lines = ["# Generated by `python -m gpt_fpga.hw.bitstream` (make bitstream); do not edit, re-run it.",
             "# Read by build.tcl: vivado -mode batch -source build.tcl -tclargs params.tcl",
             "# Paths are relative to this file's folder.",
             "set ::gpt_fpga::params [dict create \\"]
    lines += [f"    {key} {_tcl_word(val)} \\" for key, val in values.items()]
    lines.append("]")
    return "\n".join(lines) + "\n"


def prepare(out_dir: Path, weights: str = "int8", group: int = DEFAULT_GROUP, clock_mhz: float = float(DEFAULT_CLOCK_MHZ),
            jobs: int | None = None, ports: int = DEFAULT_PORTS, strategy: str = DEFAULT_STRATEGY) -> dict:
    """Write the Verilog, the Tcl and the json into `out_dir`; return the json's content."""
    from gpt_fpga.hw.top import verilog

    fclk0_divisor(clock_mhz)
    impl_strategy(strategy, clock_mhz)
    engine = make_engine(weights, group, ports)
    jobs = jobs or max(1, min(8, os.cpu_count() or 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (f"{OUT_NAME}.bit", f"{OUT_NAME}.hwh", RESULT_NAME):
        (out_dir / stale).unlink(missing_ok=True)
    (out_dir / VERILOG_NAME).write_text(verilog(engine))  # the engine whose identity goes into the json
    for name in TCL_FILES:
        shutil.copyfile(VIVADO_DIR / name, out_dir / name)
    (out_dir / PARAMS_NAME).write_text(params_tcl(engine, clock_mhz, jobs, strategy))
    ident = identity(engine, clock_mhz)
    write_json(out_dir, ident)
    return ident


def write_json(out_dir: Path, ident: dict):
    (out_dir / f"{OUT_NAME}.json").write_text(json.dumps(ident, indent=1) + "\n")


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def critical_warnings(out_dir: Path) -> list[str]:
    """Every distinct CRITICAL WARNING line of the build's Vivado logs (the session's, then each run's)."""
    logs = [out_dir / "vivado.log"] + sorted((out_dir / PROJECT_DIR).glob("*.runs/*/runme.log"))
    seen: dict[str, None] = {}
    for log in logs:
        if log.is_file():
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith(CRITICAL):
                    seen.setdefault(line[len(CRITICAL):].strip(), None)
    return list(seen)


def run_vivado(vivado: str, out_dir: Path, ident: dict) -> dict:
    """Run build.tcl in `out_dir`; on success merge vivado_result.json into gpt_fpga.json."""
    cmd = [vivado, "-mode", "batch", "-nojournal", "-log", "vivado.log", "-source", "build.tcl",
           "-tclargs", PARAMS_NAME]
    print(f"running: {' '.join(cmd)}  (in {_shown(out_dir)}; about 10-30 minutes)", flush=True)
    rc = subprocess.run(cmd, cwd=out_dir).returncode
    bit, hwh = out_dir / f"{OUT_NAME}.bit", out_dir / f"{OUT_NAME}.hwh"
    if rc != 0 or not bit.is_file() or not hwh.is_file():
        raise BitstreamError(f"Vivado failed (exit {rc}): see {_shown(out_dir / 'vivado.log')} (the line starting "
                             f"'ERROR: [gpt_fpga]'; timing: {_shown(out_dir / (OUT_NAME + '_timing.rpt'))})", code=1)
    result_path = out_dir / RESULT_NAME
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if result:
        result["critical_warnings"] = critical_warnings(out_dir)
    ident["vivado"] = result or None
    write_json(out_dir, ident)
    return ident


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description="Build the PYNQ-Z2 overlay with Vivado (batch mode).")
    ap.add_argument("--weights", default="int8", help="int8 (default) or int4")
    ap.add_argument("--group", type=int, default=DEFAULT_GROUP,
                    help=f"int4 group size: 32, 64 or 128 (default {DEFAULT_GROUP})")
    ap.add_argument("--clock-mhz", default=DEFAULT_CLOCK_MHZ,
                    help=f"FCLK0 / engine clock in MHz: {CLOCKS_TEXT} (default {DEFAULT_CLOCK_MHZ})")
    ap.add_argument("--ports", type=int, default=DEFAULT_PORTS,
                    help=f"DDR ports: 2 (HP0 + HP2, 128-bit engine) or 1 (HP0, 64-bit engine) (default {DEFAULT_PORTS})")
    ap.add_argument("--strategy", default=DEFAULT_STRATEGY,
                    help=f"Vivado implementation strategy: auto ({PERFORMANCE_STRATEGY} at {PERFORMANCE_FROM_MHZ:g} MHz "
                         f"and above, Vivado's defaults below), default, or a strategy name (default {DEFAULT_STRATEGY})")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "overlay", help="output folder (build/overlay)")
    ap.add_argument("--jobs", type=int, default=None, help="Vivado run jobs (default: CPUs, at most 8)")
    ap.add_argument("--vivado", default=None, help="the vivado executable (default: vivado on PATH)")
    args = ap.parse_args(argv)
    try:
        clock = parse_clock(args.clock_mhz)
        ident = prepare(args.out, args.weights, args.group, clock, args.jobs, args.ports, args.strategy)
        vivado = shutil.which(args.vivado or "vivado")
        if not vivado:
            out = _shown(args.out)
            raise BitstreamError(
                f"Vivado is needed for the bitstream and `vivado` is not on PATH ({VIVADO_VERSIONS}); the Verilog and "
                f"Tcl flow are written to {out}/ (copy it to a Vivado machine and run `vivado -mode batch -source "
                f"build.tcl -tclargs params.tcl` there); `make synth` gives open-source utilization and Fmax reports")
        ident = run_vivado(vivado, args.out, ident)
    except BitstreamError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    v = ident["vivado"] or {}
    warned = v.get("critical_warnings") or []
    print(f"overlay: {_shown(args.out / (OUT_NAME + '.bit'))}, {_shown(args.out / (OUT_NAME + '.hwh'))}, "
          f"{_shown(args.out / (OUT_NAME + '.json'))}; Vivado {v.get('vivado_version')}, FCLK0 "
          f"{v.get('fclk0_actual_mhz')} MHz, {v.get('impl_strategy')}, WNS {v.get('wns_ns')} ns, WPWS "
          f"{v.get('wpws_ns')} ns; {len(warned)} critical warning(s)" + (" (listed in the json)" if warned else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
