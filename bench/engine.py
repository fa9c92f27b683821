"""The engine against its roofline (the ``engine`` section of ``make bench``): ``build/bench/engine.json``
and ``engine.png``.

Whole tokens at real shapes, random weights, through the real driver (``host/driver.py``) on the engine's
RTL (``host/rtl_device.py``: Verilator, DDR model with 85-cycle read latency and one 64-bit beat per
cycle): TinyStories-33M (GPT-Neo) int8 and int4 (group 32) at positions 0 and 2047, GPT-2 124M int4 at
positions 0 and 1023. A late position is reached by setting the driver's position (the KV rows'
contents do not change the timing). Per run: bytes moved (BEATS_READ + BEATS_WRITTEN of every command
x bus bytes), cycles (sum of CYCLES), ``roofline_fraction`` = bytes / (bus bytes x cycles), tokens/s
at 100 MHz, at 142.857 MHz and projected on the PYNQ-Z2; per command: cycles, beats and wall time.

Also:

* ``step_profile``: one LAYER (and the HEAD) of each configuration sampled every
  :data:`PROFILE_CHUNK` cycles for the STEP register, so the cycles that move no beat can be named;
* ``what_if_128bit``: the same TinyStories-33M tokens on a 128-bit engine whose DDR model is capped at
  the PYNQ-Z2's usable DDR bandwidth at 142.857 MHz (the parameter that closes the tokens/s gap);
* ``host``: the driver's own work per token (embedding, register writes, residual, logits, argmax /
  top-k sampling) timed on :class:`InstantDevice`, a stand-in that answers at once, next to the board's
  projected ms/token; cross-checked by subtracting the simulator's wall time in the RTL runs;
* ``rtl_backend``: ``--backend rtl`` tokens/s on the bundled models (int8) against ``--backend fixed``
  in the same run, and that their int32 logits are equal.

Images are cached in ``build/bench/engine-cache/`` (keyed by shape, quantizer settings and the
quantizer / contract sources), so a rerun only simulates. Run alone:
``python -m gpt_fpga.bench --only engine``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt_fpga.bench.readme import machine
from gpt_fpga.quantize.progress import progress

REPO = Path(__file__).resolve().parents[1]
CACHE = "engine-cache"

# ---- the projection -----------------------------------------------------------------------------
PYNQ_CLOCK_HZ = 1e9 / 7  # 142.857 MHz: FCLK from the 1000 MHz IO PLL divided by 7
CLOCKS = {"100mhz": 100e6, "142.857mhz": PYNQ_CLOCK_HZ}
PYNQ_DDR_BYTES_S = 2.1e9  # PYNQ-Z2: 16-bit DDR3-1050, peak
PYNQ_DDR_EFFICIENCY = 0.85  # usable fraction of the peak
PYNQ_DDR_USABLE = PYNQ_DDR_BYTES_S * PYNQ_DDR_EFFICIENCY  # 1.785 GB/s

# ---- goals --------------------------------------------------------------------------------------
GOAL_ROOFLINE_FRACTION = 0.9
GOAL_TOK_S = {("tinystories-33m", "int8"): 20.0, ("tinystories-33m", "int4"): 40.0}  # at pynq_z2
RTL_BACKEND_GOAL_TOK_S = 2.0

# ---- what runs ----------------------------------------------------------------------------------
GROUP = 32
BUS_BITS = 64
CALIB_TOKENS = 32  # self-generated calibration text: the scales do not change the timing
SEED = 0
TOKEN = 464  # the token decoded in every run (any id; the timing does not depend on it)
RUNS = (("tinystories-33m", "int8", (0, 2047)),
        ("tinystories-33m", "int4", (0, 2047)),
        ("gpt2-124m", "int4", (0, 1023)))
WHAT_IF_128 = (("tinystories-33m", "int8", (0, 2047)), ("tinystories-33m", "int4", (0, 2047)))
PROFILE_CHUNK = 64  # cycles between STEP samples: each step boundary is placed within this many cycles
HOST_TOKENS = 32  # tokens timed on the instant device, per configuration
RTL_BACKEND_MODELS = ("gpt2-kjv", "neo-kjv")
RTL_BACKEND_TOKENS = 16  # timed tokens per backend (after RTL_BACKEND_WARMUP)
RTL_BACKEND_WARMUP = 2
TOP_K = 50


def model_configs() -> dict:
    from gpt_fpga.bench.shapes import GPT2_124M, TINYSTORIES_33M

    return {"tinystories-33m": TINYSTORIES_33M, "gpt2-124m": GPT2_124M}


# =================================================================================================
# pure arithmetic (tests/test_bench_engine.py)


def roofline_tok_s(clock_hz: float, bus_bytes: int, nbytes: int) -> float:
    """Tokens/s if every cycle moved one full bus beat: clock x bus bytes / bytes per token."""
    return clock_hz * bus_bytes / nbytes


def pynq_z2_tok_s(cycles: int, nbytes: int) -> float:
    """The PYNQ-Z2 projection: the engine at 142.857 MHz, also capped by its DDR (2.1 GB/s x 0.85)."""
    return min(PYNQ_CLOCK_HZ / cycles, PYNQ_DDR_USABLE / nbytes)


def pynq_z2_binding(cycles: int, nbytes: int) -> str:
    """Which of the two limits of :func:`pynq_z2_tok_s` binds."""
    return "engine cycles" if PYNQ_CLOCK_HZ / cycles <= PYNQ_DDR_USABLE / nbytes else "DDR bandwidth"


def run_record(model: str, weights: str, position: int, commands: list[dict], bus_bytes: int,
               ddr_bytes_per_cycle: float | None = None) -> dict:
    """One run's record from its commands' counters (each: cycles, beats_read, beats_written).

    ``stream_cycles``: the cycles the token's reads need at the read channel's rate (the bus, or a DDR
    model slower than the bus: `ddr_bytes_per_cycle`); ``overhead_cycles`` = cycles - stream_cycles, what
    overlapping every serial step with the stream could win at most."""
    cycles = sum(int(c["cycles"]) for c in commands)
    beats = sum(int(c["beats_read"]) + int(c["beats_written"]) for c in commands)
    read_bytes = sum(int(c["beats_read"]) for c in commands) * bus_bytes
    nbytes = beats * bus_bytes
    stream = read_bytes / min(bus_bytes, ddr_bytes_per_cycle or bus_bytes)
    return {"model": model, "weights": weights, "position": int(position), "bytes": nbytes, "cycles": cycles,
            "beats_per_cycle": beats / cycles, "roofline_fraction": nbytes / (bus_bytes * cycles),
            "tok_s": {**{name: hz / cycles for name, hz in CLOCKS.items()},
                      "pynq_z2": pynq_z2_tok_s(cycles, nbytes)},
            "roofline_tok_s_142.857mhz": roofline_tok_s(PYNQ_CLOCK_HZ, bus_bytes, nbytes),
            "pynq_z2_binding": pynq_z2_binding(cycles, nbytes),
            "bus_bytes": bus_bytes, "stream_cycles": stream, "overhead_cycles": cycles - stream,
            "commands": [dict(c) for c in commands]}


def evaluate_goals(runs: list[dict]) -> list[dict]:
    """The goals, each with its measured value and pass/fail."""
    goals = []
    for r in runs:
        goals.append({"goal": f"roofline_fraction >= {GOAL_ROOFLINE_FRACTION}", "model": r["model"],
                      "weights": r["weights"], "position": r["position"], "value": r["roofline_fraction"],
                      "target": GOAL_ROOFLINE_FRACTION, "pass": r["roofline_fraction"] >= GOAL_ROOFLINE_FRACTION})
    for r in runs:
        target = GOAL_TOK_S.get((r["model"], r["weights"]))
        if target is not None:
            v = r["tok_s"]["pynq_z2"]
            goals.append({"goal": f"pynq_z2 tok/s >= {target:g}", "model": r["model"], "weights": r["weights"],
                          "position": r["position"], "value": v, "target": target, "pass": v >= target})
    return goals


def step_breakdown(samples: list[tuple[str, int, int, int]]) -> list[dict]:
    """(step, cycles, beats_read, beats_written) intervals, summed per step in first-seen order;
    ``idle_cycles`` = cycles - beats read - beats written (floor 0): cycles that moved no beat."""
    order, acc = [], {}
    for step, cyc, rd, wr in samples:
        if step not in acc:
            order.append(step)
            acc[step] = [0, 0, 0]
        a = acc[step]
        a[0], a[1], a[2] = a[0] + cyc, a[1] + rd, a[2] + wr
    return [{"step": s, "cycles": acc[s][0], "beats_read": acc[s][1], "beats_written": acc[s][2],
             "idle_cycles": max(0, acc[s][0] - acc[s][1] - acc[s][2])} for s in order]


def bytes_needed_for(tok_s: float, nbytes: int, fraction: float) -> float:
    """Bus bytes/s an engine streaming at `fraction` of its roofline needs for `tok_s` tokens/s."""
    return tok_s * nbytes / fraction


# =================================================================================================
# the plot


def plot_engine(result: dict, path: Path) -> None:
    """Left: achieved tok/s at 142.857 MHz against the roofline and the PYNQ-Z2 DDR ceiling, per run
    (64-bit bus). Right: the same for the 128-bit what-if runs (if measured), with the goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("64-bit bus, DDR model 8 B/cycle\n(label: tok/s, % of the roofline)", result["runs"], False)]
    if result.get("what_if_128bit", {}).get("runs"):
        panels.append(("what-if: 128-bit bus, DDR model capped at 1.785 GB/s\n(label: tok/s, % of the DDR ceiling)",
                       result["what_if_128bit"]["runs"], True))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.3 * sum(len(p[1]) for p in panels) + 2.5, 5.6),
                             squeeze=False, gridspec_kw={"width_ratios": [len(p[1]) for p in panels]})
    for ax, (title, runs, vs_ddr) in zip(axes[0], panels):
        x = np.arange(len(runs))
        achieved = [r["tok_s"]["142.857mhz"] for r in runs]
        roof = [r["roofline_tok_s_142.857mhz"] for r in runs]
        ddr = [PYNQ_DDR_USABLE / r["bytes"] for r in runs]
        w = 0.28
        b1 = ax.bar(x - w, roof, w, label="roofline: clock x bus / bytes", color="#c8c8c8")
        b2 = ax.bar(x, achieved, w, label="achieved at 142.857 MHz", color="tab:blue")
        ax.bar(x + w, ddr, w, label="PYNQ-Z2 DDR ceiling (1.785 GB/s)", color="#f2c49b")
        for rect, r, d in zip(b2, runs, ddr):
            frac = r["tok_s"]["142.857mhz"] / d if vs_ddr else r["roofline_fraction"]
            ax.annotate(f"{r['tok_s']['142.857mhz']:.1f}\n{100 * frac:.1f}%",
                        (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="top",
                        fontsize=7, color="white", fontweight="bold", xytext=(0, -3), textcoords="offset points")
        del b1
        for i, r in enumerate(runs):
            goal = GOAL_TOK_S.get((r["model"], r["weights"]))
            if goal is not None:
                ax.plot([i - 1.6 * w, i + 1.6 * w], [goal, goal], color="tab:red", lw=1.5, ls="--",
                        label="goal at pynq_z2" if i == 0 else None)
        labels = [f"{r['model']}\n{r['weights']} @ {r['position']}" for r in runs]
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.set_ylim(0, max(max(roof), max(ddr), 45) * 1.18)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Decoder engine (RTL, one token per run): tokens/s at 142.857 MHz against the bandwidth roofline",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =================================================================================================
# devices and images


class _InstantBuffer(np.ndarray):
    device_address: int = 0

    def __array_finalize__(self, obj):
        self.device_address = getattr(obj, "device_address", 0)

    def flush(self) -> None:
        pass

    def invalidate(self) -> None:
        pass


class InstantDevice:
    """The driver's device protocol answered at once: every command has finished when it is started.

    Times the host's own work per token. Its identity registers are copied from a real device
    (``identity``: offset -> word); register accesses are counted (``reads``, ``writes``)."""

    def __init__(self, identity: dict[int, int]):
        from gpt_fpga.contract import registers as rm

        self.regs = dict(identity)
        self.status = rm.register("STATUS").offset
        self.done = rm.register("STATUS").pack(done=1)
        self.reads = self.writes = 0
        self._next = 0x1000_0000

    def read_reg(self, offset: int) -> int:
        self.reads += 1
        return self.done if offset == self.status else self.regs.get(offset, 0)

    def write_reg(self, offset: int, value: int) -> None:
        self.writes += 1

    def allocate(self, nbytes: int):
        buf = np.zeros(int(nbytes), np.uint8).view(_InstantBuffer)
        buf.device_address = self._next
        self._next += -(-int(nbytes) // 4096) * 4096
        return buf

    def wait_interrupt(self, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        pass


IDENTITY_REGISTERS = ("ID", "VERSION", "HW_CONFIG", "MAX_D_IN", "MAX_CONTEXT", "MAX_HEAD_DIM")


def identity_words(device) -> dict[int, int]:
    from gpt_fpga.contract import registers as rm

    return {rm.register(n).offset: device.read_reg(rm.register(n).offset) for n in IDENTITY_REGISTERS}


# what an image's bytes depend on besides its settings (descriptors, registers and the driver are not
# part of the image: editing them must not invalidate the cache)
IMAGE_SOURCES = ("quantize/quantizer.py", "quantize/checkpoint.py", "contract/numerics.py",
                 "contract/layout.py", "contract/image.py", "contract/config.py", "sim/float_model.py",
                 "sim/random_checkpoint.py")


def _source_hash() -> str:
    h = hashlib.sha256()
    for name in IMAGE_SOURCES:
        h.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _cached(path: Path, key: dict) -> bool:
    meta = path.with_suffix(".json")
    try:
        return path.is_file() and json.loads(meta.read_text()) == key
    except (OSError, ValueError):
        return False


def _stamp(path: Path, key: dict) -> None:
    path.with_suffix(".json").write_text(json.dumps(key, indent=1) + "\n")


def random_images(cache: Path, model: str, formats: list[tuple[str, int]]) -> dict:
    """{(weights, bus_bits): image path} of a random-weight `model` (fp16 checkpoint, N(0, 0.02) init,
    LayerNorm gains 1), quantized with CALIB_TOKENS self-generated tokens; cached."""
    from gpt_fpga.quantize.quantizer import quantize_checkpoint
    from gpt_fpga.sim.random_checkpoint import random_tensors, write_checkpoint

    cfg = model_configs()[model]
    src = _source_hash()
    out, todo = {}, []
    for weights, bus_bits in formats:
        img = cache / f"{model}-{weights}-{bus_bits}.img"
        key = {"config": cfg, "seed": SEED, "std": 0.02, "dtype": "float16", "weights": weights, "group": GROUP,
               "bus_bits": bus_bits, "calib_tokens": CALIB_TOKENS, "sources": src}
        out[(weights, bus_bits)] = img
        if not _cached(img, key):
            todo.append((weights, bus_bits, img, key))
    if todo:
        ckpt = cache / f"{model}-checkpoint"
        try:
            tqdm.write(f"engine: writing a random {model} checkpoint (fp16) ...")
            tensors = {k: v.astype(np.float16) for k, v in random_tensors(cfg, seed=SEED, std=0.02,
                                                                          ln_jitter=False).items()}
            write_checkpoint(ckpt, cfg, tensors)
            del tensors
            for weights, bus_bits, img, key in todo:
                tqdm.write(f"engine: quantizing {model} {weights} ({bus_bits}-bit) -> {img}")
                img.unlink(missing_ok=True)
                quantize_checkpoint(ckpt, img, weights=weights, group=GROUP, bus_bits=bus_bits,
                                    calib_tokens=CALIB_TOKENS, progress=False)
                _stamp(img, key)
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)
    return out


def bundled_image(cache: Path, name: str) -> Path:
    """The bundled model quantized int8 with the default calibration (as a user gets it); cached."""
    from gpt_fpga.quantize.quantizer import quantize_checkpoint

    model_dir = REPO / "models" / name
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    img = cache / f"{name}-int8.img"
    key = {"model": name, "files": h.hexdigest()[:16], "weights": "int8", "sources": _source_hash()}
    if not _cached(img, key):
        tqdm.write(f"engine: quantizing {name} int8 -> {img}")
        quantize_checkpoint(model_dir, img, weights="int8", group=GROUP, progress=False)
        _stamp(img, key)
    return img


def _timed_driver_class():
    from gpt_fpga.host.driver import Driver

    class TimedDriver(Driver):
        """The driver, with each command's host wall time and the simulator's share of it."""

        def run(self, op: int, layer: int = 0) -> dict:
            t0, w0 = time.perf_counter(), self.device.stats()["wall_s"]
            stats = super().run(op, layer)  # the dict appended to last_stats
            stats["wall_s"] = time.perf_counter() - t0
            stats["sim_wall_s"] = self.device.stats()["wall_s"] - w0
            return stats

    return TimedDriver


# =================================================================================================
# measurements


def profile_command(device, op: int, layer: int, position: int, chunk: int = PROFILE_CHUNK) -> list[dict]:
    """Run one command (the descriptor table and residual already in place) in chunks of `chunk`
    cycles, reading STEP after each; the CYCLES / BEATS counters at each change of step give the
    cycles and beats of every step (each boundary placed within `chunk` cycles)."""
    from gpt_fpga.contract import registers as rm

    R = rm.register
    rd = device.read_reg
    device.write_reg(R("POSITION").offset, position)
    device.write_reg(R("COMMAND").offset, R("COMMAND").pack(op=op, layer=layer))
    device.write_reg(R("CONTROL").offset, R("CONTROL").pack(start=1))
    step_f, busy_f = R("STEP").field("step"), R("STATUS").field("busy")
    cur, start, samples = None, (0, 0, 0), []
    while True:
        device.run(chunk)
        step = step_f.get(rd(R("STEP").offset))
        busy = busy_f.get(rd(R("STATUS").offset))
        if step != cur or not busy:
            now = (rd(R("CYCLES").offset), rd(R("BEATS_READ").offset), rd(R("BEATS_WRITTEN").offset))
            if cur is not None:
                samples.append((rm.STEPS[cur], *(a - b for a, b in zip(now, start))))
            cur, start = step, now
        if not busy:
            break
    status = R("STATUS").unpack(rd(R("STATUS").offset))
    device.write_reg(R("IRQ_STATUS").offset, R("IRQ_STATUS").pack(done=1))
    if status["error"]:
        raise RuntimeError(f"profiled command op={op} layer={layer} ended with an error")
    return step_breakdown(samples)


def measure_config(image_path: Path, model: str, positions, bus_bits: int, bar, ddr: dict | None = None,
                   profile: bool = True) -> dict:
    """Decode one token at each position on a fresh RtlDevice; per run the record, per configuration
    the STEP profile of LAYER 0 (each position) and of the HEAD (first position)."""
    from gpt_fpga.host.rtl_device import RtlDevice
    from gpt_fpga.contract import registers as rm
    from gpt_fpga.contract.image import read_image
    from gpt_fpga.contract.layout import decode_bytes_per_token
    from gpt_fpga.contract.config import ModelConfig

    image = read_image(image_path)
    hw = image.hw
    cfg = ModelConfig.from_dict(image.header["config"])
    device = RtlDevice(weights=hw.weights, group=hw.group, bus_bits=hw.bus_bits, clock_hz=PYNQ_CLOCK_HZ)
    if ddr:
        device.configure_ddr(**ddr)
    try:
        driver = _timed_driver_class()(image, device)
        ident = identity_words(device)
        runs, profiles = [], []
        for i, pos in enumerate(positions):
            bar.set_postfix_str(f"{model} {hw.weights} {bus_bits}-bit @ {pos}")
            driver.length = pos
            device.clear_stats()
            t0 = time.perf_counter()
            logits = driver.step(TOKEN)
            int(np.argmax(logits))
            wall = time.perf_counter() - t0
            sim = device.stats()
            commands = [{"name": s["command"], "cycles": s["cycles"], "beats_read": s["beats_read"],
                         "beats_written": s["beats_written"], "wall_s": s["wall_s"], "sim_wall_s": s["sim_wall_s"]}
                        for s in driver.last_stats]
            rec = run_record(model, hw.weights, pos, commands, hw.bus_bytes, device.ddr["bytes_per_cycle"])
            model_bytes = decode_bytes_per_token(cfg, hw, pos)
            rec.update({"model_bytes": model_bytes, "wall_s": wall, "sim_wall_s": sim["wall_s"],
                        "sim_cycles_per_s": sim["cycles_per_s"],
                        "host_ms_by_subtraction": 1e3 * (wall - sim["wall_s"])})
            runs.append(rec)
            bar.update(1)
            if profile:
                bar.set_postfix_str(f"{model} {hw.weights} @ {pos}: STEP profile")
                driver.write_residual(driver.embed(TOKEN, pos))
                prof = {"model": model, "weights": hw.weights, "bus_bits": bus_bits, "position": pos,
                        "command": "LAYER 0", "steps": profile_command(device, rm.OP_LAYER, 0, pos)}
                profiles.append(prof)
                # a local layer differs from layer 0 only past the window
                if cfg.n_layer > 1 and cfg.local_layers[1] and pos >= cfg.window_size:
                    profiles.append({**prof, "command": "LAYER 1 (local)",
                                     "steps": profile_command(device, rm.OP_LAYER, 1, pos)})
                if i == 0:
                    profiles.append({**prof, "command": "HEAD",
                                     "steps": profile_command(device, rm.OP_HEAD, 0, pos)})
        return {"runs": runs, "profiles": profiles, "identity": ident, "ddr": device.ddr}
    finally:
        device.close()


def host_cost(image_path: Path, identity: dict, tokens: int = HOST_TOKENS) -> dict:
    """The driver's own work per token, on InstantDevice: step() (embedding, residual write, register
    writes and reads, logits read) plus turning the logits into the next token (argmax; top-k 50
    sampling at temperature 1). Medians over `tokens` tokens after a warm-up."""
    from gpt_fpga.host.driver import Driver
    from gpt_fpga.host.generate import Sampling, sample_next
    from gpt_fpga.contract import numerics as nx
    from gpt_fpga.contract.image import read_image

    image = read_image(image_path)
    dev = InstantDevice(identity)
    driver = Driver(image, dev)
    rng = np.random.default_rng(0)
    topk = Sampling(temperature=1.0, top_k=TOP_K)
    ids = rng.integers(0, driver.vocab, tokens + 4)
    step_s, argmax_s, topk_s = [], [], []
    r0, w0 = dev.reads, dev.writes
    for i, tok in enumerate(ids):
        driver.length = i % driver.n_ctx
        t0 = time.perf_counter()
        logits = driver.step(int(tok))
        t1 = time.perf_counter()
        z = (logits * 2.0 ** -nx.LOGIT_FRAC).astype(np.float32)
        int(np.argmax(z))
        t2 = time.perf_counter()
        sample_next(z, topk, rng)
        t3 = time.perf_counter()
        if i == 3:
            r0, w0 = dev.reads, dev.writes
        if i >= 4:
            step_s.append(t1 - t0)
            argmax_s.append(t2 - t1)
            topk_s.append(t3 - t2)
    med = lambda v: float(np.median(v)) * 1e3  # noqa: E731
    return {"driver_step_ms": med(step_s), "logits_argmax_ms": med(argmax_s), "top_k_sample_ms": med(topk_s),
            "host_ms_per_token": med(step_s) + med(argmax_s) + med(topk_s),
            "register_reads_per_token": (dev.reads - r0) / tokens,
            "register_writes_per_token": (dev.writes - w0) / tokens, "tokens": tokens}


def rtl_backend_speed(cache: Path, bar) -> dict:
    """--backend rtl against --backend fixed on the bundled int8 models: the same greedy tokens through
    both (rtl's int32 logits must equal fixed's), tokens/s of each, and the ratio."""
    from gpt_fpga.host.backends import FixedBackend, RtlBackend

    out = {}
    for name in RTL_BACKEND_MODELS:
        img = bundled_image(cache, name)
        rtl, fixed = RtlBackend(img), FixedBackend(img)
        try:
            ids = rtl.codec.encode("And God said")
            rtl.reset(), fixed.reset()
            times = {"rtl": [], "fixed": []}
            equal, tok = True, ids[0]
            prompt = list(ids)
            for i in range(RTL_BACKEND_WARMUP + RTL_BACKEND_TOKENS):
                bar.set_postfix_str(f"--backend rtl {name} token {i + 1}")
                got = {}
                for key, backend in (("rtl", rtl), ("fixed", fixed)):
                    t0 = time.perf_counter()
                    got[key] = backend.forward_int([tok])[0]
                    if i >= RTL_BACKEND_WARMUP:
                        times[key].append(time.perf_counter() - t0)
                equal &= bool(np.array_equal(got["rtl"], got["fixed"]))
                tok = prompt[i + 1] if i + 1 < len(prompt) else int(np.argmax(got["fixed"]))
                bar.update(1)
            rtl_tok_s = len(times["rtl"]) / sum(times["rtl"])
            fixed_tok_s = len(times["fixed"]) / sum(times["fixed"])
            cyc = rtl.device.stats()
            out[name] = {"weights": "int8", "tokens": RTL_BACKEND_TOKENS, "rtl_tok_s": rtl_tok_s,
                         "fixed_tok_s": fixed_tok_s, "rtl_to_fixed_speed": rtl_tok_s / fixed_tok_s,
                         "logits_equal": equal, "goal_tok_s": RTL_BACKEND_GOAL_TOK_S,
                         "pass": rtl_tok_s >= RTL_BACKEND_GOAL_TOK_S,
                         "sim_cycles_per_s": cyc["cycles_per_s"],
                         "cycles_per_token": cyc["cycles"] / (RTL_BACKEND_WARMUP + RTL_BACKEND_TOKENS)}
        finally:
            rtl.device.close()
    return out


# =================================================================================================
# the analysis


def _steps_of(profiles: list[dict], model: str, weights: str, position: int, bus_bits: int,
              command: str = "LAYER 0"):
    for p in profiles:
        if (p["model"], p["weights"], p["position"], p["command"], p["bus_bits"]) == \
                (model, weights, position, command, bus_bits):
            return p["steps"]
    return None


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f} %"


def analysis(result: dict) -> dict:
    """Where the cycles go, and which engine parameter closes the gap to the goals (numbers from the runs)."""
    from gpt_fpga.contract.config import parse_config

    runs, profiles = result["runs"], result["step_profile"]
    cfgs = {name: parse_config(c) for name, c in model_configs().items()}
    one_port = BUS_BITS // 8 * PYNQ_CLOCK_HZ
    text = []
    worst = min(runs, key=lambda r: r["roofline_fraction"])
    text.append(
        f"Roofline fraction: every run moves {min(r['roofline_fraction'] for r in runs):.3f} to "
        f"{max(r['roofline_fraction'] for r in runs):.3f} of a 64-bit beat per cycle (lowest: {worst['model']} "
        f"{worst['weights']} at position {worst['position']}), so the >= {GOAL_ROOFLINE_FRACTION} goal holds. The "
        f"serial steps (LayerNorm, softmax, residual load/store, descriptor fetch) are not overlapped with the weight "
        f"stream, but they are short next to it: per token they cost " +
        ", ".join(f"{_pct(r['overhead_cycles'], r['cycles'])} ({r['model']} {r['weights']} @ {r['position']})"
                  for r in runs) + " of the cycles (overhead = cycles - read bytes / 8).")
    by_step = {}
    for r in runs:
        steps = _steps_of(profiles, r["model"], r["weights"], r["position"], BUS_BITS)
        if steps is None:
            continue
        cfg = cfgs[r["model"]]
        keys = r["position"] + 1  # layer 0 is global in both models
        layer_cycles = sum(s["cycles"] for s in steps)
        idle = {s["step"]: s["idle_cycles"] for s in steps if s["idle_cycles"] > 0}
        sm = idle.get("scores_softmax", 0)
        key = f"{r['model']} {r['weights']} @ {r['position']}"
        by_step[key] = {"command": "LAYER 0", "layer_cycles": layer_cycles, "idle_cycles": sum(idle.values()),
                        "idle_fraction": sum(idle.values()) / layer_cycles, "idle_by_step": idle,
                        "softmax_idle_per_head": sm / cfg.n_head, "visible_keys": keys}
        top = sorted(idle.items(), key=lambda kv: -kv[1])[:4]
        text.append(f"{key}, LAYER 0 by STEP: {sum(idle.values())} of {layer_cycles} cycles move no beat "
                    f"({_pct(sum(idle.values()), layer_cycles)}): " + ", ".join(f"{k} {v}" for k, v in top)
                    + f"; scores_softmax loses {sm / cfg.n_head:.0f} cycles per head for {keys} visible keys.")
    p0 = next((p["steps"] for p in profiles if p["command"] == "LAYER 0" and p["bus_bits"] == BUS_BITS), None)
    if p0:
        ln = next(s for s in p0 if s["step"] == "ln1")
        io = sum(s["idle_cycles"] for s in p0 if s["step"] in ("fetch_descriptor", "load_residual", "store_residual"))
        text.append(f"Per layer: each LayerNorm pass takes {ln['cycles']} cycles (3d + 76 at d = 768) for its "
                    f"{ln['beats_read']} parameter beats, so {ln['idle_cycles']} move nothing; descriptor fetch, "
                    f"residual load and store lose ~{io} together; per head, scores_softmax loses about one cycle "
                    f"per visible key plus ~190 cycles (the K and V reads' DDR latency): the softmax pass over a "
                    f"head's scores is not overlapped with the next head's reads. The matvec steps lose only "
                    f"~50-400 cycles each (one DDR latency plus the pipeline).")
    gap = {}
    for (model, weights), goal in GOAL_TOK_S.items():
        rs = [r for r in runs if (r["model"], r["weights"]) == (model, weights)]
        if not rs:
            continue
        r = max(rs, key=lambda r: r["bytes"])  # the worse position
        roof, ddr_roof = one_port / r["bytes"], PYNQ_DDR_USABLE / r["bytes"]
        need = bytes_needed_for(goal, r["bytes"], r["roofline_fraction"])
        gap[f"{model} {weights}"] = {
            "position": r["position"], "bytes": r["bytes"], "pynq_z2_tok_s": r["tok_s"]["pynq_z2"], "goal": goal,
            "one_64bit_port_roofline_tok_s": roof, "ddr_roofline_tok_s": ddr_roof,
            "bus_bytes_per_s_needed": need, "clock_mhz_needed_64bit": need / 8 / 1e6,
            "clock_mhz_needed_128bit": need / 16 / 1e6, "ddr_fraction_needed": need / PYNQ_DDR_USABLE}
        text.append(
            f"Tokens/s goal, {model} {weights}: {r['bytes'] / 1e6:.1f} MB per token at position {r['position']}; one "
            f"64-bit port at 142.857 MHz ({one_port / 1e9:.3f} GB/s) allows at most {roof:.1f} tok/s even at the full "
            f"roofline ({r['tok_s']['pynq_z2']:.1f} measured), against {goal:g}. {goal:g} tok/s at this roofline "
            f"fraction needs {need / 1e9:.2f} GB/s on the bus, {_pct(need, PYNQ_DDR_USABLE)} of the board's usable "
            f"{PYNQ_DDR_USABLE / 1e9:.3f} GB/s DDR (its ceiling: {ddr_roof:.1f} tok/s): {need / 8 / 1e6:.0f} MHz on "
            f"one 64-bit port, or {need / 16 / 1e6:.0f} MHz on a 128-bit one.")
    text.append(
        f"Binding limit on the PYNQ-Z2: the engine's single 64-bit HP port at 142.857 MHz ({one_port / 1e9:.3f} GB/s), "
        f"not the DDR ({PYNQ_DDR_USABLE / 1e9:.3f} GB/s usable): in every run clock/cycles < DDR/bytes, so pynq_z2 "
        f"equals the 142.857 MHz figure. Overlapping LayerNorm/softmax/write-back with the stream would win only the "
        f"overhead above (<= {100 * max(r['overhead_cycles'] / r['cycles'] for r in runs):.1f} %), and a higher "
        f"clock on one port needs the MHz above, beyond the cores' Fmax proxy (113-126 MHz). What closes the gap is "
        f"bus width: bus_bits=128 (the layout and the engine support it; or two 64-bit HP ports) at 142.857 MHz "
        f"offers {2 * one_port / 1e9:.2f} GB/s, so the DDR becomes the limit.")
    wi = result.get("what_if_128bit", {}).get("runs") or []
    whatif = []
    for r in wi:
        goal = GOAL_TOK_S.get((r["model"], r["weights"]))
        got = r["tok_s"]["pynq_z2"]
        overlapped = PYNQ_CLOCK_HZ / r["stream_cycles"]
        steps = _steps_of(profiles, r["model"], r["weights"], r["position"], 128)
        sm = next((s["idle_cycles"] for s in steps if s["step"] == "scores_softmax"), 0) if steps else 0
        whatif.append({"model": r["model"], "weights": r["weights"], "position": r["position"], "tok_s": got,
                       "goal": goal, "pass": got >= goal if goal else None,
                       "ddr_fraction": r["bytes"] * r["tok_s"]["142.857mhz"] / PYNQ_DDR_USABLE,
                       "overhead_cycles": r["overhead_cycles"], "tok_s_if_overlapped": overlapped,
                       "layer0_softmax_idle_cycles": sm})
        text.append(
            f"Measured what-if (128-bit engine, DDR model capped at {result['what_if_128bit']['ddr_bytes_per_cycle']:.3f} "
            f"B/cycle = 1.785 GB/s): {r['model']} {r['weights']} @ {r['position']}: {got:.1f} tok/s"
            + (f" (goal {goal:g}: {'met' if got >= goal else 'missed'})" if goal else "")
            + f", {_pct(r['bytes'] * r['tok_s']['142.857mhz'], PYNQ_DDR_USABLE)} of the usable DDR; "
              f"{_pct(r['overhead_cycles'], r['cycles'])} of the cycles are serial-step overhead (LAYER 0 "
              f"scores_softmax alone {sm}); with them overlapped: {overlapped:.1f} tok/s.")
    missed = [w for w in whatif if w["pass"] is False]
    if whatif:
        text.append("So a 128-bit bus at 142.857 MHz meets " +
                    (f"every tokens/s goal." if not missed else
                     "the goals except " + ", ".join(f"{w['model']} {w['weights']} @ {w['position']} "
                                                     f"({w['tok_s']:.1f} vs {w['goal']:g})" for w in missed)
                     + ", which the DDR ceiling still allows: overlapping each head's softmax with the next head's "
                       "K/V reads (and the LayerNorm passes with the next matrix's first rows) closes it ("
                     + ", ".join(f"{w['tok_s_if_overlapped']:.1f} tok/s" for w in missed) + " with no serial-step "
                       "overhead)."))
    for r in runs:
        if r["model"] == "tinystories-33m" and r["position"] == 0:
            head = next(c for c in r["commands"] if c["name"] == "HEAD")
            text.append(f"Observation: in {r['model']} {r['weights']} the HEAD (lm_head, 50257 x 768) is "
                        f"{_pct(head['cycles'], r['cycles'])} of the token's cycles.")
    return {"text": text, "layer0_by_step": by_step, "tok_s_gap": gap, "what_if_128bit": whatif,
            "binding_limit_pynq_z2": f"one 64-bit HP port at 142.857 MHz ({one_port / 1e9:.3f} GB/s) < usable DDR "
                                     f"({PYNQ_DDR_USABLE / 1e9:.3f} GB/s)",
            "closes_gap": "bus_bits=128 (or a second 64-bit HP port) at 142.857 MHz; then, at late positions, "
                          "overlapping the per-head softmax (and the LayerNorm passes) with the stream"}


# =================================================================================================
# the section


def bench_engine(out: Path) -> dict:
    out = Path(out)
    t_start = time.perf_counter()
    cache = out / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    # images (cached)
    formats: dict[str, list] = {}
    for model, weights, _ in RUNS:
        formats.setdefault(model, []).append((weights, BUS_BITS))
    for model, weights, _ in WHAT_IF_128:
        formats.setdefault(model, []).append((weights, 128))
    t0 = time.perf_counter()
    images = {model: random_images(cache, model, fmts) for model, fmts in formats.items()}
    images_s = time.perf_counter() - t0

    n_steps = sum(len(p) for *_, p in RUNS) + sum(len(p) for *_, p in WHAT_IF_128) + \
        len(RTL_BACKEND_MODELS) * (RTL_BACKEND_WARMUP + RTL_BACKEND_TOKENS)
    runs, profiles, hosts, what_if, timings = [], [], {}, [], {}
    ddr128 = {"bytes_per_cycle": PYNQ_DDR_USABLE / PYNQ_CLOCK_HZ}
    with progress(total=n_steps, desc="engine (RTL tokens)", unit="tok") as bar:
        t0 = time.perf_counter()
        for model, weights, positions in RUNS:
            img = images[model][(weights, BUS_BITS)]
            m = measure_config(img, model, positions, BUS_BITS, bar)
            runs += m["runs"]
            profiles += m["profiles"]
            bar.set_postfix_str(f"{model} {weights}: host cost")
            h = host_cost(img, m["identity"])
            board_ms = [1e3 / r["tok_s"]["pynq_z2"] for r in m["runs"]]
            hosts[f"{model} {weights}"] = {**h, "board_ms_per_token": {str(r["position"]): b for r, b in
                                                                       zip(m["runs"], board_ms)},
                                           "host_to_board_ratio": h["host_ms_per_token"] / min(board_ms),
                                           "host_ms_by_subtraction": {str(r["position"]): r["host_ms_by_subtraction"]
                                                                      for r in m["runs"]}}
            ddr64 = m["ddr"]
        timings["runs_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for model, weights, positions in WHAT_IF_128:
            img = images[model][(weights, 128)]
            m = measure_config(img, model, positions, 128, bar, ddr=ddr128)
            what_if += m["runs"]
            profiles += m["profiles"]
        timings["what_if_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rtl = rtl_backend_speed(cache, bar)
        timings["rtl_backend_s"] = time.perf_counter() - t0

    result = {
        "setup": {"engine": "hw/engine.py in Verilator (host/rtl_device.py) through host/driver.py",
                  "machine": machine(),
                  "ddr_model": ddr64, "bus_bits": BUS_BITS, "group": GROUP, "clocks_hz": CLOCKS,
                  "pynq_z2": {"clock_hz": PYNQ_CLOCK_HZ, "ddr_bytes_s": PYNQ_DDR_BYTES_S,
                              "ddr_efficiency": PYNQ_DDR_EFFICIENCY, "usable_ddr_bytes_s": PYNQ_DDR_USABLE,
                              "one_64bit_port_bytes_s": 8 * PYNQ_CLOCK_HZ,
                              "formula": "tok/s = min(clock / cycles, 2.1e9 * 0.85 / bytes)"},
                  "weights": "random N(0, 0.02), LayerNorm gains 1, fp16 checkpoint, seed 0",
                  "calib_tokens": CALIB_TOKENS, "token": TOKEN,
                  "late_position": "driver.length set directly (the KV rows' contents do not change the timing)",
                  "bytes": "(BEATS_READ + BEATS_WRITTEN) x bus bytes, summed over the token's commands",
                  "model_bytes": "layout.decode_bytes_per_token: weights + lm_head + visible KV (reads only; the "
                                 "engine also reads LayerNorm parameters, descriptors and the residual, and writes "
                                 "K/V rows, the residual and the logits)",
                  "image_cache": str(cache)},
        "runs": runs,
        "what_if_128bit": {"what": "the same TinyStories-33M tokens on a 128-bit engine (bus_bits=128 images), DDR "
                                   "model capped at the PYNQ-Z2's usable 1.785 GB/s at 142.857 MHz",
                           "ddr_bytes_per_cycle": ddr128["bytes_per_cycle"], "runs": what_if},
        "step_profile": profiles,
        "host": {"what": "the driver's own work per token on InstantDevice (answers every register access at "
                         "once): embedding, residual write, COMMAND/CONTROL/STATUS/IRQ/counter registers, logits "
                         "read, then argmax and top-k sampling, on this machine. The board's Cortex-A9 is several "
                         "times slower and its MMIO register accesses (counted here) are not instant, so read the "
                         "ratio as a lower bound; host_ms_by_subtraction (step wall time minus the simulator's) is "
                         "an upper bound: it includes the cold caches after each simulated command",
                 **hosts},
        "rtl_backend": rtl,
    }
    result["goals"] = evaluate_goals(runs) + [
        {"goal": f"--backend rtl >= {RTL_BACKEND_GOAL_TOK_S:g} tok/s", "model": name, "weights": "int8",
         "value": v["rtl_tok_s"], "target": RTL_BACKEND_GOAL_TOK_S, "pass": v["pass"]} for name, v in rtl.items()]
    result["all_goals_pass"] = all(g["pass"] for g in result["goals"])
    result["analysis"] = analysis(result)
    timings.update(images_s=images_s, total_s=time.perf_counter() - t_start)
    result["runtime_s"] = timings
    (out / "engine.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_engine(result, out / "engine.png")
    return result


def summary(r: dict) -> str:
    """One paragraph for `make bench`."""
    runs = ", ".join(f"{x['model']} {x['weights']}@{x['position']} {x['tok_s']['pynq_z2']:.1f} tok/s "
                     f"({x['roofline_fraction']:.3f})" for x in r["runs"])
    failed = [g for g in r["goals"] if not g["pass"]]
    rtl = ", ".join(f"{k} {v['rtl_tok_s']:.2f} tok/s ({v['rtl_to_fixed_speed']:.2f}x fixed)"
                    for k, v in r["rtl_backend"].items())
    host = max(v["host_to_board_ratio"] for k, v in r["host"].items() if isinstance(v, dict))
    return (f"engine: pynq_z2 tok/s (roofline fraction): {runs}; host cost <= {100 * host:.1f} % of the board's "
            f"ms/token; --backend rtl {rtl}; goals: {len(r['goals']) - len(failed)}/{len(r['goals'])} pass"
            + (f" (missed: {'; '.join(sorted({g['goal'] + ' ' + g['model'] + ' ' + g['weights'] for g in failed}))})"
               if failed else "")
            + f"; {r['runtime_s']['total_s']:.0f} s")


# =================================================================================================
# the README's tables (bench/readme.py writes them between <!-- bench:NAME --> markers)

MODEL_NAMES = {"tinystories-33m": "TinyStories-33M", "gpt2-124m": "GPT-2 124M"}


def _weights_label(weights: str, group: int) -> str:
    return f"int4 (g{group})" if weights == "int4" else weights


def readme_tables(record: dict) -> dict[str, str]:
    """engine: the roofline table; engine-notes: what it means, in numbers; engine-host: the host's cost
    and --backend rtl, timed on the machine the record names."""
    group, runs = record["setup"]["group"], record["runs"]
    rows = ["| model | weights | position | bytes/token | cycles | roofline fraction | tok/s @ 100 MHz | "
            "@ 142.857 MHz | PYNQ-Z2 | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        goal = GOAL_TOK_S.get((r["model"], r["weights"]))
        t = r["tok_s"]
        rows.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {_weights_label(r['weights'], group)} | "
                    f"{r['position']} | {r['bytes'] / 1e6:.2f} MB | {r['cycles']:,} | {r['roofline_fraction']:.3f} | "
                    f"{t['100mhz']:.1f} | {t['142.857mhz']:.1f} | **{t['pynq_z2']:.1f}** | "
                    + (f">= {goal:g}: {'met' if t['pynq_z2'] >= goal else 'missed'}" if goal else "") + " |")

    fractions = [r["roofline_fraction"] for r in runs]
    overhead = [r["overhead_cycles"] / r["cycles"] for r in runs]
    one_port = BUS_BITS // 8 * PYNQ_CLOCK_HZ
    late = {w: max((r for r in runs if r["model"] == "tinystories-33m" and r["weights"] == w),
                   key=lambda r: r["position"]) for w in ("int8", "int4")}
    notes = [f"The engine keeps the bus {100 * min(fractions):.1f}-{100 * max(fractions):.1f} % busy; the serial "
             f"steps (LayerNorm passes, per-head softmax, descriptor and residual traffic) cost "
             f"{100 * min(overhead):.1f}-{100 * max(overhead):.1f} % of a token. The board goals are missed because "
             f"one 64-bit port at 142.857 MHz carries {one_port / 1e9:.3f} GB/s, below the PYNQ-Z2's "
             f"{PYNQ_DDR_USABLE / 1e9:.3f} GB/s usable DDR: even a perfect engine on that port makes "
             f"{one_port / late['int8']['bytes']:.1f} (int8) and {one_port / late['int4']['bytes']:.1f} (int4) tok/s "
             f"at position {late['int8']['position']}."]
    what_if = record.get("what_if_128bit", {}).get("runs") or []
    if what_if:
        what_if = sorted(what_if, key=lambda r: r["position"])
        parts = [" / ".join(f"{r['tok_s']['pynq_z2']:.1f}" for r in what_if if r["weights"] == w) + f" tok/s {w}"
                 for w in dict.fromkeys(r["weights"] for r in what_if)]
        positions = " / ".join(str(p) for p in dict.fromkeys(r["position"] for r in what_if))
        notes.append("The parameter that closes the gap is the bus width: the same engine at `bus_bits=128` (two HP "
                     f"ports), measured with the DDR model capped at 1.785 GB/s, makes {' and '.join(parts)} "
                     f"(positions {positions}).")
    head = next((r for r in runs if r["model"] == "tinystories-33m" and r["position"] == 0), None)
    if head is not None:
        cmd = next(c for c in head["commands"] if c["name"] == "HEAD")
        notes.append(f"The HEAD (the 50257 x 768 tied lm_head) is {100 * cmd['cycles'] / head['cycles']:.0f} % of a "
                     f"TinyStories {head['weights']} token.")

    machine = record["setup"].get("machine", {})
    on = f"{machine.get('cpus', '?')}-core {machine.get('processor', 'machine')}"
    host = [f"Timed on the machine that ran the bench ({on}); the board's numbers are projections from the cycles "
            f"above.", "",
            "| configuration | host ms/token (driver step + argmax + top-k 50) | board ms/token (projected) | "
            "host / board |", "|---|---|---|---|"]
    for name, h in record["host"].items():
        if not isinstance(h, dict):
            continue
        model, weights = name.split(" ")
        board = " / ".join(f"{ms:.1f} (@ {pos})" for pos, ms in h["board_ms_per_token"].items())
        host.append(f"| {MODEL_NAMES.get(model, model)} {_weights_label(weights, group)} | "
                    f"{h['host_ms_per_token']:.2f} | {board} | {100 * h['host_to_board_ratio']:.1f} % |")
    host += ["", "| bundled model (int8) | `--backend rtl` tok/s | `--backend fixed` tok/s | rtl / fixed | "
             "int32 logits equal |", "|---|---|---|---|---|"]
    for name, v in record["rtl_backend"].items():
        host.append(f"| {name} | {v['rtl_tok_s']:.2f} | {v['fixed_tok_s']:.1f} | {v['rtl_to_fixed_speed']:.3f} | "
                    f"{'yes' if v['logits_equal'] else '**no**'} |")
    host += ["", f"The engine section took {record['runtime_s']['total_s'] / 60:.0f} min on that machine."]
    return {"engine": "\n".join(rows), "engine-notes": " ".join(notes), "engine-host": "\n".join(host)}
