"""Benchmarks: ``python -m gpt_fpga.bench --out build/bench [--only float ...]``.

Each section is a function ``bench_<name>(out: Path) -> dict`` registered in :data:`BENCHES`; it writes
``out/<name>.json`` and returns what it wrote. Sections added later follow the same pattern. With
``--readme`` (``make bench``), the sections that render README tables (``readme_tables`` in their module,
bench/readme.py) are copied to ``bench/records/`` and the README's measured tables are rewritten from them.
Standard output carries progress and results only: the simulators write to log files (cocotb: ``out/logs/``;
the engine's Verilator build: its ``build/rtl/<hash>/build.log``), named on failure.

float
    The float32 golden model (sim/float_model.py) against transformers, side by side in one process on
    a random GPT-Neo of TinyStories-33M shape: prefill of a 256-token prompt and decode ms/token with
    the KV cache. Also ``load_memory``: peak RSS of loading a GPT-2-124M-shaped fp32 checkpoint.

engine
    Whole tokens through the driver on the engine's RTL (Verilator, DDR model) at TinyStories-33M and
    GPT-2 124M shapes against the bandwidth roofline, with a PYNQ-Z2 projection (bench/engine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gpt_fpga.bench.shapes import GPT2_124M, TINYSTORIES_33M
from gpt_fpga.quantize.progress import progress

REPO = Path(__file__).resolve().parents[1]

PROMPT_LEN = 256
DECODE_STEPS = 64
WARMUP_STEPS = 8
ROUNDS = 3  # alternating golden / transformers rounds; each a prefill then DECODE_STEPS steps


def _write_json(path: Path, obj: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return obj


# ---------------------------------------------------------------------------------------------
# load memory

# ru_maxrss is not enough on its own: Linux carries the parent's high-water mark into a forked and exec'd
# child, so a child of this (large) process would report the parent's RSS. VmHWM in /proc/self/status
# belongs to the child's own address space; ru_maxrss is recorded next to it.
_LOAD_CHILD = r"""
import json, resource, sys

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None

from gpt_fpga.quantize.checkpoint import load_checkpoint
base = status("VmRSS")
ck = load_checkpoint(sys.argv[1])
n = sum(a.nbytes for a in ck.params.values())
print(json.dumps({"baseline_rss": base, "peak_rss": status("VmHWM"), "params_bytes": n,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_random_gpt2_124m(model_dir: Path, seed: int = 0) -> Path:
    """A random fp32 GPT-2-124M-shaped checkpoint (HF names, Conv1D layouts, no lm_head), ~0.5 GB."""
    from gpt_fpga.sim.random_checkpoint import random_tensors, write_checkpoint

    return write_checkpoint(model_dir, GPT2_124M, random_tensors(GPT2_124M, seed=seed, std=0.02, ln_jitter=False))


def bench_load_memory(tmp: Path) -> dict:
    """Peak RSS of a fresh process that loads a GPT-2-124M fp32 checkpoint, relative to the file size."""
    model_dir = tmp / "gpt2-124m-random"
    try:
        write_random_gpt2_124m(model_dir)
        file_bytes = (model_dir / "model.safetensors").stat().st_size
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        run = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(model_dir)], capture_output=True, text=True,
                             env=env, cwd=REPO, check=False)
        if run.returncode:
            raise RuntimeError(f"load_checkpoint child failed:\n{run.stderr}")
        child = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    peak, base = child["peak_rss"], child["baseline_rss"]
    return {"model": "random GPT-2 124M shape, fp32", "file_bytes": file_bytes, "params_bytes": child["params_bytes"],
            "baseline_rss_bytes": base, "peak_rss_bytes": peak, "rss_ratio": peak / file_bytes,
            "rss_ratio_above_baseline": (peak - base) / file_bytes, "ru_maxrss_bytes": child["ru_maxrss"]}


# ---------------------------------------------------------------------------------------------
# float golden model vs transformers

def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class _GoldenRunner:
    """One prefill then cached decode steps on the float32 golden model."""

    def __init__(self, model):
        self.model = model

    def prefill(self, prompt):
        self.model.reset()
        logits = self.model.forward(prompt)
        assert logits.dtype == np.float32

    def step(self, tok):
        return self.model.forward([tok])


class _TransformersRunner:
    """The same with transformers' own forward and its KV cache (no generate() overhead)."""

    def __init__(self, model):
        import torch

        self.torch, self.model, self.pkv = torch, model, None

    def prefill(self, prompt):
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([prompt]), use_cache=True)
        assert out.logits.dtype == self.torch.float32
        self.pkv = out.past_key_values

    def step(self, tok):
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([[tok]]), past_key_values=self.pkv, use_cache=True)
        self.pkv = out.past_key_values
        return out.logits


def _time_round(runner, prompt: list[int], steps: list[int], desc: str) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) for one fresh prompt."""
    t0 = time.perf_counter()
    runner.prefill(prompt)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for tok in progress(steps, desc=desc, unit="tok", leave=False):
        runner.step(tok)
    return prefill, (time.perf_counter() - t0) / len(steps)


def _time_side_by_side(runners: dict, prompt: list[int], steps: list[int]) -> dict:
    """Warm both up, then alternate rounds so that any load on the machine hits both alike; medians."""
    for r in runners.values():
        r.prefill(prompt)
        for tok in steps[:WARMUP_STEPS]:
            r.step(tok)
    times = {name: [] for name in runners}
    for i in range(ROUNDS):
        for name, r in runners.items():
            times[name].append(_time_round(r, prompt, steps, f"{name} decode {i + 1}/{ROUNDS}"))
    return {name: {"decode_ms_per_token": _ms(float(np.median([d for _, d in t]))),
                   "prefill_ms": _ms(float(np.median([p for p, _ in t])))} for name, t in times.items()}


def bench_float(out: Path) -> dict:
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from gpt_fpga.quantize.checkpoint import load_checkpoint
    from gpt_fpga.sim.float_model import FloatModel

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    tmp = out / "tmp"
    model_dir = tmp / "tinystories-33m-random"
    try:
        torch.manual_seed(0)
        cfg = {k: v for k, v in TINYSTORIES_33M.items() if k != "model_type"}
        print("building a random TinyStories-33M-shaped GPT-Neo ...", flush=True)
        hf = GPTNeoForCausalLM(GPTNeoConfig(**cfg)).to(torch.float32).eval()
        hf.save_pretrained(model_dir, safe_serialization=True)
        ck = load_checkpoint(model_dir)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    golden = FloatModel(ck.config, ck.params)

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, ck.config.vocab_size, PROMPT_LEN).tolist()
    steps = rng.integers(0, ck.config.vocab_size, DECODE_STEPS).tolist()

    # same numbers on both sides before timing anything
    golden.reset()
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt[:32]])).logits[0].numpy()
    max_diff = float(np.abs(golden.forward(prompt[:32]) - ref).max())

    result = _time_side_by_side({"golden": _GoldenRunner(golden), "transformers": _TransformersRunner(hf)},
                                prompt, steps)
    result["decode_speed_ratio"] = round(result["transformers"]["decode_ms_per_token"]
                                         / result["golden"]["decode_ms_per_token"], 3)
    del hf, golden, ck  # free ~0.5 GB before writing the next checkpoint
    print("measuring checkpoint load memory (GPT-2 124M shape) ...", flush=True)
    result["load_memory"] = bench_load_memory(tmp)
    result["setup"] = {"model": "random GPT-Neo, TinyStories-33M shape", "dtype": "float32",
                       "prompt_tokens": PROMPT_LEN, "decode_steps": DECODE_STEPS, "warmup_steps": WARMUP_STEPS,
                       "rounds": ROUNDS,
                       "torch_threads": threads, "max_abs_logit_diff_32_tokens": max_diff,
                       "numpy": np.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        tmp.rmdir()
    except OSError:
        pass
    return _write_json(out / "float.json", result)


def _summary_float(r: dict) -> str:
    g, t, m = r["golden"], r["transformers"], r["load_memory"]
    return (f"float: decode golden {g['decode_ms_per_token']:.2f} ms/tok, transformers "
            f"{t['decode_ms_per_token']:.2f} ms/tok (ratio {r['decode_speed_ratio']:.2f}x); prefill "
            f"{PROMPT_LEN} tok golden {g['prefill_ms']:.1f} ms, transformers {t['prefill_ms']:.1f} ms\n"
            f"       load memory: peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB for a "
            f"{m['file_bytes'] / 2**20:.0f} MiB file (ratio {m['rss_ratio']:.2f})")


def _summary_accuracy(r: dict) -> str:
    lines = []
    for model, e in r["models"].items():
        for key, a in e["runs"].items():
            lines.append(f"accuracy {model} {key}: ppl {a['ppl']:.3f} vs float {e['float_ppl']:.3f} "
                         f"(x{a['ratio']:.4f}), top-1 agreement {a['top1_agreement']:.4f}")
        h = e["lm_head_study"]
        lines.append(f"accuracy {model} lm_head (int4 g128 gptq): nearest x{h['nearest']:.4f}, gptq x{h['gptq']:.4f}")
        st = e["activation_scale_study"]
        lines.append(f"accuracy {model} activation scales (fake-quant, float weights): static {st['static']:.3f}, "
                     f"dynamic {st['dynamic']:.3f}, float {st['float']:.3f}")
    lines.append("accuracy goals: " + ", ".join(f"{k} <= +{g['bound'] * 100:g} % {'met' if g['met'] else 'MISSED'}"
                                                for k, g in r["goals"].items()))
    lines.append(f"accuracy int4 default group: {r['int4_default_group']['picked']}")
    return "\n".join(lines)


def _summary_fixed(r: dict) -> str:
    q4 = r["quantize_gpt2_124m_int4_seconds"]
    return (f"fixed: decode {r['fixed']['decode_ms_per_token']:.2f} ms/tok vs float "
            f"{r['float']['decode_ms_per_token']:.2f} ms/tok ({r['fixed_to_float_speed']:.2f}x float speed); "
            f"quantize GPT-2 124M {r['quantize_gpt2_124m_seconds']:.1f} s (int8), int4 "
            f"g{r['quantize_gpt2_124m_int4_group']} nearest {q4['nearest']:.1f} s, gptq {q4['gptq']:.1f} s "
            f"(load average {r['load_average']['before_int4'][0]:.1f} on {r['load_average']['cpus']} CPUs)")


def _lazy(module: str, name: str):
    def run(out: Path) -> dict:
        import importlib

        return getattr(importlib.import_module(module), name)(out)
    return run


def _summary_cores(r: dict) -> str:
    return "\n".join(f"cores: matvec {fmt}: {v['beats']} beats in {v['cycles']} cycles, efficiency {v['efficiency']:.5f}"
                     for fmt, v in r["matvec"].items())


def _summary_engine(r: dict) -> str:
    from gpt_fpga.bench.engine import summary

    return summary(r)


BENCHES = {"float": (bench_float, _summary_float),
           "cores": (_lazy("gpt_fpga.bench.cores", "bench_cores"), _summary_cores),
           "accuracy": (_lazy("gpt_fpga.bench.accuracy", "bench_accuracy"), _summary_accuracy),
           "fixed": (_lazy("gpt_fpga.bench.accuracy", "bench_fixed"), _summary_fixed),
           "engine": (_lazy("gpt_fpga.bench.engine", "bench_engine"), _summary_engine)}


def main(argv: list[str] | None = None) -> int:
    from gpt_fpga.bench import readme

    ap = argparse.ArgumentParser(prog="python -m gpt_fpga.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench", help="output directory (default %(default)s)")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), metavar="NAME",
                    help=f"run only these sections (default: all of {', '.join(BENCHES)})")
    ap.add_argument("--readme", action="store_true",
                    help="also commit-ready: copy the records of the sections that feed README.md to bench/records/ "
                         "and rewrite README.md's measured tables from them (make bench)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(BENCHES):
        fn, summary = BENCHES[name]
        result = fn(args.out)
        print(summary(result))
        print(f"wrote {args.out / (name + '.json')}")
        if args.readme and (kept := readme.record(name, args.out)) is not None:
            print(f"wrote {kept.relative_to(REPO)}")
    if args.readme:
        changed = readme.update()
        print(f"README.md: {', '.join(changed) or 'no'} measured table(s) changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
