"""Cycle counts of the cores in simulation (Verilator): `python -m gpt_fpga.bench.cores --out build/bench`.

matvec: a 768 x 3072 matvec (d_out 768, d_in 3072: GPT-2 small's MLP projection) streamed with no
back-pressure at the PYNQ-Z2 default configuration (64-bit bus, int4 group 32); `cycles` runs
from the first accepted weight beat to the last, so `efficiency` = beats / cycles is the fraction
of cycles on which the core took a weight beat (1.0: no bubble between rows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MATVEC_BENCH = {"int8": dict(bus_bits=64, weights="int8", group=32),
                "int4": dict(bus_bits=64, weights="int4", group=32)}


def bench_matvec(log_dir: Path, sim: str = "verilator", formats=tuple(MATVEC_BENCH)) -> dict:
    """The throughput of each format; the simulator's output goes to log_dir/<format>/{build,test}.log."""
    from gpt_fpga.hw.matvec import MatVec
    from gpt_fpga.sim.tb.runner import BUILD, param_slug, run_cocotb

    results = {}
    for fmt in formats:
        params = MATVEC_BENCH[fmt]
        dut = MatVec(**params)
        out = BUILD / "matvec" / f"{sim}-{param_slug(params)}" / "bench_throughput.json"
        out.unlink(missing_ok=True)
        print(f"cores: matvec {fmt} on {sim} ...", flush=True)
        run_cocotb("matvec", dut, "gpt_fpga.sim.tb.matvec", sim, params=params, testcase="test_throughput",
                   tb_params={"latency": dut.latency, "throughput": True, "result_json": str(out)},
                   log_dir=Path(log_dir) / f"matvec-{fmt}")
        results[fmt] = json.loads(out.read_text())[fmt]
    return results


def bench_cores(out: Path) -> dict:
    """Run the core benchmarks; return them and write them to out/cores.json."""
    out = Path(out)
    logs = out / "logs" / "cores"
    print(f"cores: simulator output in {logs}/", flush=True)
    result = {"matvec": bench_matvec(logs)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cores.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/bench"))
    args = ap.parse_args(argv)
    print(json.dumps(bench_cores(args.out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
