"""The engine against its roofline (the ``engine`` section of ``make bench``): ``build/bench/engine.json``
and ``engine.png``.

Whole tokens at real shapes, random weights, through the real driver (``host/driver.py``) on the engine's
RTL (``host/rtl_device.py``: Verilator, a DDR model with 85-cycle read latency): TinyStories-33M
(GPT-Neo) int8 and int4 (group 32) at positions 0 and 2047, GPT-2 124M int4 at positions 0 and 1023,
on two engines (:data:`ENGINES`):

* ``two_port`` (``runs``), the board's default: a 128-bit datapath on two 64-bit ports, the DDR model
  capped at the PYNQ-Z2's usable 1.785 GB/s at 142.857 MHz (12.495 bytes per cycle, shared by both
  ports), so ``tok_s.pynq_z2`` = 142.857 MHz / cycles is the board's projection;
* ``one_port`` (``one_port.runs``), the comparison: a 64-bit engine on one port, one beat per cycle.

A late position is reached by setting the driver's position (the KV rows' contents do not change the
timing). Per run: ``ports``, ``bus_bits``, bytes moved (BEATS_READ + BEATS_WRITTEN of every command x
bus bytes), cycles (sum of CYCLES), ``roofline_fraction`` = bytes / (bus bytes x cycles),
``ddr_fraction`` = (bytes / 1.785 GB/s) / (cycles / 142.857 MHz), the share of the usable DDR the engine
turns into tokens; tokens/s at 100 MHz, at 142.857 MHz and on the PYNQ-Z2; per command: cycles, beats
and wall time.

Also:

* ``step_profile``: one LAYER (and the HEAD) of each configuration sampled every
  :data:`PROFILE_CHUNK` cycles for the STEP register, so the cycles that move no beat can be named
  (``analysis.serial_steps``: each step's idle cycles as a share of a token);
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
from gpt_fpga.contract.layout import DEFAULT_GROUP
from gpt_fpga.quantize.progress import progress

REPO = Path(__file__).resolve().parents[1]
CACHE = "engine-cache"

# ---- the projection -----------------------------------------------------------------------------
PYNQ_CLOCK_HZ = 1e9 / 7  # 142.857 MHz: FCLK from the 1000 MHz IO PLL divided by 7
CLOCKS = {"100mhz": 100e6, "142.857mhz": PYNQ_CLOCK_HZ}
PYNQ_DDR_BYTES_S = 2.1e9  # PYNQ-Z2: 16-bit DDR3-1050, peak
PYNQ_DDR_EFFICIENCY = 0.85  # usable fraction of the peak
PYNQ_DDR_USABLE = PYNQ_DDR_BYTES_S * PYNQ_DDR_EFFICIENCY  # 1.785 GB/s

PYNQ_DDR_BYTES_PER_CYCLE = PYNQ_DDR_USABLE / PYNQ_CLOCK_HZ  # 12.495

# ---- goals --------------------------------------------------------------------------------------
GOAL_ROOFLINE_FRACTION = 0.9  # one-port runs: the engine keeps its one port busy
GOAL_DDR_FRACTION = 0.95  # two-port runs: the share of the usable DDR turned into tokens
GOAL_TOK_S = {("tinystories-33m", "int8"): 24.0, ("tinystories-33m", "int4"): 46.0}  # pynq_z2, position 0
GOAL_POSITION = 0
SERIAL_STEP_LIMIT = 0.01  # a step whose idle cycles cost more than this share of a token is named
RTL_BACKEND_GOAL_TOK_S = 2.0

# ---- what runs ----------------------------------------------------------------------------------
# name -> engine and DDR model; the first is the board's default (the "runs" of the record)
ENGINES = {"two_port": {"bus_bits": 128, "ports": 2, "ddr_bytes_per_cycle": PYNQ_DDR_BYTES_PER_CYCLE},
           "one_port": {"bus_bits": 64, "ports": 1, "ddr_bytes_per_cycle": 8.0}}
DEFAULT_ENGINE = "two_port"
GROUP = DEFAULT_GROUP  # the quantizer's and the bitstream's int4 default
CALIB_TOKENS = 32  # self-generated calibration text: the scales do not change the timing
SEED = 0
TOKEN = 464  # the token decoded in every run (any id; the timing does not depend on it)
RUNS = (("tinystories-33m", "int8", (0, 2047)),
        ("tinystories-33m", "int4", (0, 2047)),
        ("gpt2-124m", "int4", (0, 1023)))
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


def ddr_fraction(nbytes: int, cycles: int) -> float:
    """The share of the PYNQ-Z2's usable DDR bandwidth a token of `nbytes` in `cycles` at 142.857 MHz uses."""
    return (nbytes / PYNQ_DDR_USABLE) / (cycles / PYNQ_CLOCK_HZ)


def run_record(model: str, weights: str, position: int, commands: list[dict], bus_bytes: int,
               ddr_bytes_per_cycle: float | None = None, ports: int = 1) -> dict:
    """One run's record from its commands' counters (each: cycles, beats_read, beats_written).

    ``stream_cycles``: the cycles the token's reads need at the read channel's rate (the bus, or a DDR
    model slower than the bus: `ddr_bytes_per_cycle`); ``overhead_cycles`` = cycles - stream_cycles, what
    overlapping every serial step with the stream could win at most."""
    cycles = sum(int(c["cycles"]) for c in commands)
    beats = sum(int(c["beats_read"]) + int(c["beats_written"]) for c in commands)
    read_bytes = sum(int(c["beats_read"]) for c in commands) * bus_bytes
    nbytes = beats * bus_bytes
    stream = read_bytes / min(bus_bytes, ddr_bytes_per_cycle or bus_bytes)
    return {"model": model, "weights": weights, "position": int(position), "ports": ports, "bus_bits": 8 * bus_bytes,
            "bytes": nbytes, "cycles": cycles,
            "beats_per_cycle": beats / cycles, "roofline_fraction": nbytes / (bus_bytes * cycles),
            "ddr_fraction": ddr_fraction(nbytes, cycles),
            "tok_s": {**{name: hz / cycles for name, hz in CLOCKS.items()},
                      "pynq_z2": pynq_z2_tok_s(cycles, nbytes)},
            "roofline_tok_s_142.857mhz": roofline_tok_s(PYNQ_CLOCK_HZ, bus_bytes, nbytes),
            "pynq_z2_binding": pynq_z2_binding(cycles, nbytes),
            "bus_bytes": bus_bytes, "stream_cycles": stream, "overhead_cycles": cycles - stream,
            "commands": [dict(c) for c in commands]}


def _goal(name: str, r: dict, value: float, target: float) -> dict:
    return {"goal": name, "model": r["model"], "weights": r["weights"], "position": r["position"],
            "ports": r.get("ports", 1), "value": value, "target": target, "pass": value >= target}


def evaluate_goals(runs: list[dict], one_port: list[dict] = ()) -> list[dict]:
    """The goals, each with its measured value and pass/fail: on the two-port (default) runs the DDR
    fraction and the TinyStories-33M tokens/s at position 0; on the one-port runs the roofline fraction."""
    goals = [_goal(f"ddr_fraction >= {GOAL_DDR_FRACTION}", r, r["ddr_fraction"], GOAL_DDR_FRACTION) for r in runs]
    for r in runs:
        target = GOAL_TOK_S.get((r["model"], r["weights"]))
        if target is not None and r["position"] == GOAL_POSITION:
            goals.append(_goal(f"pynq_z2 tok/s >= {target:g}", r, r["tok_s"]["pynq_z2"], target))
    goals += [_goal(f"one port: roofline_fraction >= {GOAL_ROOFLINE_FRACTION}", r, r["roofline_fraction"],
                    GOAL_ROOFLINE_FRACTION) for r in one_port]
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
    """Tokens/s per run on the PYNQ-Z2 (142.857 MHz): one port, two ports, and the DDR roofline (usable
    DDR / bytes per token), side by side, with the goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    one = {(r["model"], r["weights"], r["position"]): r for r in result.get("one_port", {}).get("runs", [])}
    x = np.arange(len(runs))
    w = 0.27
    fig, ax = plt.subplots(figsize=(1.4 * len(runs) + 3, 5.6))
    bars = []
    if one:
        one_tok = [one[(r["model"], r["weights"], r["position"])]["tok_s"]["pynq_z2"]
                   if (r["model"], r["weights"], r["position"]) in one else 0.0 for r in runs]
        bars.append(ax.bar(x - w, one_tok, w, label="one 64-bit port", color="#9db7d5"))
    two = [r["tok_s"]["pynq_z2"] for r in runs]
    b2 = ax.bar(x, two, w, label="two 64-bit ports (128-bit engine)", color="tab:blue")
    roof = [PYNQ_DDR_USABLE / r["bytes"] for r in runs]
    ax.bar(x + w, roof, w, label="DDR roofline (1.785 GB/s / bytes)", color="#f2c49b")
    for rect, r in zip(b2, runs):
        ax.annotate(f"{r['tok_s']['pynq_z2']:.1f}\n{100 * r['ddr_fraction']:.1f}%",
                    (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="top",
                    fontsize=7, color="white", fontweight="bold", xytext=(0, -3), textcoords="offset points")
    drawn = False
    for i, r in enumerate(runs):
        goal = GOAL_TOK_S.get((r["model"], r["weights"]))
        if goal is not None and r["position"] == GOAL_POSITION:
            ax.plot([i - 1.6 * w, i + 1.6 * w], [goal, goal], color="tab:red", lw=1.5, ls="--",
                    label=None if drawn else "goal (two ports)")
            drawn = True
    ax.set_xticks(x, [f"{r['model']}\n{r['weights']} @ {r['position']}" for r in runs], fontsize=8)
    ax.set_ylabel("tokens/s on the PYNQ-Z2 (142.857 MHz)")
    ax.set_title("Decoder engine (RTL, one token per run); label: tok/s, share of the usable DDR", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.set_ylim(0, max(max(roof), 50) * 1.15)
    ax.legend(fontsize=8, loc="upper right")
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


def measure_config(image_path: Path, model: str, positions, engine: dict, bar, profile: bool = True) -> dict:
    """Decode one token at each position on a fresh RtlDevice; per run the record, per configuration
    the STEP profile of LAYER 0 (each position) and of the HEAD (first position)."""
    from gpt_fpga.host.rtl_device import RtlDevice
    from gpt_fpga.contract import registers as rm
    from gpt_fpga.contract.image import read_image
    from gpt_fpga.contract.layout import decode_bytes_per_token
    from gpt_fpga.contract.config import ModelConfig

    image = read_image(image_path)
    hw = image.hw
    bus_bits, ports = engine["bus_bits"], engine["ports"]
    assert hw.bus_bits == bus_bits, (hw.bus_bits, bus_bits)
    cfg = ModelConfig.from_dict(image.header["config"])
    device = RtlDevice(weights=hw.weights, group=hw.group, bus_bits=hw.bus_bits, ports=ports, clock_hz=PYNQ_CLOCK_HZ,
                       bytes_per_cycle=engine["ddr_bytes_per_cycle"])
    try:
        driver = _timed_driver_class()(image, device)
        ident = identity_words(device)
        runs, profiles = [], []
        for i, pos in enumerate(positions):
            bar.set_postfix_str(f"{model} {hw.weights} {ports} port(s) @ {pos}")
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
            rec = run_record(model, hw.weights, pos, commands, hw.bus_bytes, device.ddr["bytes_per_cycle"], ports)
            model_bytes = decode_bytes_per_token(cfg, hw, pos)
            rec.update({"model_bytes": model_bytes, "wall_s": wall, "sim_wall_s": sim["wall_s"],
                        "sim_cycles_per_s": sim["cycles_per_s"],
                        "host_ms_by_subtraction": 1e3 * (wall - sim["wall_s"])})
            runs.append(rec)
            bar.update(1)
            if profile:
                bar.set_postfix_str(f"{model} {hw.weights} @ {pos}: STEP profile")
                driver.write_residual(driver.embed(TOKEN, pos))
                prof = {"model": model, "weights": hw.weights, "bus_bits": bus_bits, "ports": ports, "position": pos,
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


def _steps_of(profiles: list[dict], model: str, weights: str, position: int, ports: int,
              command: str = "LAYER 0"):
    for p in profiles:
        if (p["model"], p["weights"], p["position"], p["command"], p.get("ports", 1)) == \
                (model, weights, position, command, ports):
            return p["steps"]
    return None


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f} %"


def serial_steps(run: dict, steps: list[dict], n_layer: int) -> list[dict]:
    """The steps of one LAYER whose serial cycles (cycles beyond what its beats need at the run's read
    rate: the bus, or the DDR model when it is slower), repeated over the model's `n_layer` layers, cost
    more than SERIAL_STEP_LIMIT of the run's token; largest first."""
    bus = run["bus_bytes"]
    read_bytes = sum(int(c["beats_read"]) for c in run["commands"]) * bus
    rate = min(bus, read_bytes / run["stream_cycles"]) if run["stream_cycles"] else bus  # bytes per cycle
    out = []
    for st in steps:
        serial = max(0.0, st["cycles"] - (st["beats_read"] + st["beats_written"]) * bus / rate)
        share = serial * n_layer / run["cycles"]
        if share > SERIAL_STEP_LIMIT:
            out.append({"step": st["step"], "serial_cycles_per_layer": round(serial), "share_of_token": share})
    return sorted(out, key=lambda x: -x["share_of_token"])


def analysis(result: dict) -> dict:
    """Where the cycles go on the default (two-port) engine, what one port would give, and which serial
    steps still cost more than 1 % of a token (numbers from the runs)."""
    from gpt_fpga.contract.config import parse_config

    runs, profiles = result["runs"], result["step_profile"]
    one = {(r["model"], r["weights"], r["position"]): r for r in result.get("one_port", {}).get("runs", [])}
    cfgs = {name: parse_config(c) for name, c in model_configs().items()}
    text = []
    worst = min(runs, key=lambda r: r["ddr_fraction"])
    text.append(
        f"Two ports (128-bit engine, DDR model at the PYNQ-Z2's usable {PYNQ_DDR_USABLE / 1e9:.3f} GB/s): every run "
        f"turns {100 * min(r['ddr_fraction'] for r in runs):.1f}-{100 * max(r['ddr_fraction'] for r in runs):.1f} % "
        f"of the usable DDR into tokens (lowest: {worst['model']} {worst['weights']} at position "
        f"{worst['position']}). The rest is serial-step overhead (cycles - read bytes / DDR bytes per cycle): " +
        ", ".join(f"{_pct(r['overhead_cycles'], r['cycles'])} ({r['model']} {r['weights']} @ {r['position']})"
                  for r in runs) + ".")
    speedups = []
    for r in runs:
        o = one.get((r["model"], r["weights"], r["position"]))
        if o is not None:
            speedups.append({"model": r["model"], "weights": r["weights"], "position": r["position"],
                             "one_port_tok_s": o["tok_s"]["pynq_z2"], "two_port_tok_s": r["tok_s"]["pynq_z2"],
                             "speedup": r["tok_s"]["pynq_z2"] / o["tok_s"]["pynq_z2"]})
    if speedups:
        text.append("Against one 64-bit port (1.143 GB/s at 142.857 MHz): " + ", ".join(
            f"{s['model']} {s['weights']} @ {s['position']} {s['one_port_tok_s']:.1f} -> {s['two_port_tok_s']:.1f} "
            f"tok/s (x{s['speedup']:.2f})" for s in speedups) + f"; the DDR allows at most x"
            f"{PYNQ_DDR_USABLE / (8 * PYNQ_CLOCK_HZ):.2f}.")
    serial = {}
    for r in runs:
        steps = _steps_of(profiles, r["model"], r["weights"], r["position"], r.get("ports", 1))
        if steps is None:
            continue
        cfg = cfgs[r["model"]]
        key = f"{r['model']} {r['weights']} @ {r['position']}"
        big = serial_steps(r, steps, cfg.n_layer)
        layer_cycles = sum(s["cycles"] for s in steps)
        idle = sum(s["idle_cycles"] for s in steps)
        serial[key] = {"layer0_cycles": layer_cycles, "layer0_idle_cycles": idle, "over_limit": big}
        text.append(f"{key}, LAYER 0 by STEP: {idle} of {layer_cycles} cycles move no beat; steps whose serial cycles "
                    f"(beyond their beats at the DDR rate) x {cfg.n_layer} layers cost more than "
                    f"{100 * SERIAL_STEP_LIMIT:g} % of the token: " +
                    (", ".join(f"{b['step']} {100 * b['share_of_token']:.1f} %" for b in big) if big else "none") + ".")
    for r in runs:
        if r["model"] == "tinystories-33m" and r["position"] == 0:
            head = next(c for c in r["commands"] if c["name"] == "HEAD")
            text.append(f"In {r['model']} {r['weights']} the HEAD (lm_head, 50257 x 768) is "
                        f"{_pct(head['cycles'], r['cycles'])} of the token's cycles.")
    return {"text": text, "serial_steps": serial, "speedup_over_one_port": speedups,
            "binding_limit_pynq_z2": f"the DDR ({PYNQ_DDR_USABLE / 1e9:.3f} GB/s usable) with two 64-bit ports at "
                                     f"142.857 MHz ({16 * PYNQ_CLOCK_HZ / 1e9:.3f} GB/s)"}


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
        for engine in ENGINES.values():
            formats.setdefault(model, []).append((weights, engine["bus_bits"]))
    t0 = time.perf_counter()
    images = {model: random_images(cache, model, fmts) for model, fmts in formats.items()}
    images_s = time.perf_counter() - t0

    n_steps = len(ENGINES) * sum(len(p) for *_, p in RUNS) + \
        len(RTL_BACKEND_MODELS) * (RTL_BACKEND_WARMUP + RTL_BACKEND_TOKENS)
    by_engine = {name: {"runs": [], "ddr": None} for name in ENGINES}
    profiles, hosts, timings = [], {}, {}
    with progress(total=n_steps, desc="engine (RTL tokens)", unit="tok") as bar:
        for name, engine in ENGINES.items():
            t0 = time.perf_counter()
            for model, weights, positions in RUNS:
                img = images[model][(weights, engine["bus_bits"])]
                m = measure_config(img, model, positions, engine, bar)
                by_engine[name]["runs"] += m["runs"]
                by_engine[name]["ddr"] = m["ddr"]
                profiles += m["profiles"]
                if name == DEFAULT_ENGINE:
                    bar.set_postfix_str(f"{model} {weights}: host cost")
                    h = host_cost(img, m["identity"])
                    board_ms = [1e3 / r["tok_s"]["pynq_z2"] for r in m["runs"]]
                    hosts[f"{model} {weights}"] = {
                        **h, "board_ms_per_token": {str(r["position"]): b for r, b in zip(m["runs"], board_ms)},
                        "host_to_board_ratio": h["host_ms_per_token"] / min(board_ms),
                        "host_ms_by_subtraction": {str(r["position"]): r["host_ms_by_subtraction"] for r in m["runs"]}}
            timings[f"{name}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rtl = rtl_backend_speed(cache, bar)
        timings["rtl_backend_s"] = time.perf_counter() - t0

    runs = by_engine[DEFAULT_ENGINE]["runs"]
    one_port = by_engine["one_port"]["runs"]
    result = {
        "setup": {"engine": "hw/engine.py in Verilator (host/rtl_device.py) through host/driver.py",
                  "machine": machine(),
                  "engines": {name: {**e, "ddr_model": by_engine[name]["ddr"]} for name, e in ENGINES.items()},
                  "default_engine": DEFAULT_ENGINE, "group": GROUP, "clocks_hz": CLOCKS,
                  "pynq_z2": {"clock_hz": PYNQ_CLOCK_HZ, "ddr_bytes_s": PYNQ_DDR_BYTES_S,
                              "ddr_efficiency": PYNQ_DDR_EFFICIENCY, "usable_ddr_bytes_s": PYNQ_DDR_USABLE,
                              "one_64bit_port_bytes_s": 8 * PYNQ_CLOCK_HZ,
                              "formula": "tok/s = min(clock / cycles, 2.1e9 * 0.85 / bytes); with two ports the "
                                         "DDR model already caps the cycles, so it is clock / cycles",
                              "ddr_fraction": "(bytes / 1.785e9) / (cycles / 142.857e6)"},
                  "weights": "random N(0, 0.02), LayerNorm gains 1, fp16 checkpoint, seed 0",
                  "calib_tokens": CALIB_TOKENS, "token": TOKEN,
                  "late_position": "driver.length set directly (the KV rows' contents do not change the timing)",
                  "bytes": "(BEATS_READ + BEATS_WRITTEN) x bus bytes, summed over the token's commands",
                  "model_bytes": "layout.decode_bytes_per_token: weights + lm_head + visible KV (reads only; the "
                                 "engine also reads LayerNorm parameters, descriptors and the residual, and writes "
                                 "K/V rows, the residual and the logits)",
                  "image_cache": str(cache)},
        "runs": runs,
        "one_port": {"what": "the same tokens on the one-port 64-bit engine (bus_bits=64 images), the DDR model "
                             "at one beat per cycle: the port is the limit", "runs": one_port},
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
    result["goals"] = evaluate_goals(runs, one_port) + [
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
                     f"(DDR {x['ddr_fraction']:.3f})" for x in r["runs"])
    one = ", ".join(f"{x['tok_s']['pynq_z2']:.1f}" for x in r.get("one_port", {}).get("runs", []))
    failed = [g for g in r["goals"] if not g["pass"]]
    rtl = ", ".join(f"{k} {v['rtl_tok_s']:.2f} tok/s ({v['rtl_to_fixed_speed']:.2f}x fixed)"
                    for k, v in r["rtl_backend"].items())
    host = max(v["host_to_board_ratio"] for k, v in r["host"].items() if isinstance(v, dict))
    return (f"engine: PYNQ-Z2 tok/s, two ports (share of usable DDR): {runs}; one port: {one}; host cost <= "
            f"{100 * host:.1f} % of the board's ms/token; --backend rtl {rtl}; goals: "
            f"{len(r['goals']) - len(failed)}/{len(r['goals'])} pass"
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
    one = {(r["model"], r["weights"], r["position"]): r for r in record.get("one_port", {}).get("runs", [])}
    rows = ["| model | weights | position | bytes/token | cycles | share of usable DDR | PYNQ-Z2 tok/s, two ports | "
            "one port | DDR roofline | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        goal = GOAL_TOK_S.get((r["model"], r["weights"])) if r["position"] == GOAL_POSITION else None
        o = one.get((r["model"], r["weights"], r["position"]))
        t = r["tok_s"]["pynq_z2"]
        rows.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {_weights_label(r['weights'], group)} | "
                    f"{r['position']} | {r['bytes'] / 1e6:.2f} MB | {r['cycles']:,} | {100 * r['ddr_fraction']:.1f} % | "
                    f"**{t:.1f}** | {o['tok_s']['pynq_z2']:.1f} | {PYNQ_DDR_USABLE / r['bytes']:.1f} | "
                    + (f">= {goal:g}: {'met' if t >= goal else 'missed'}" if goal else "") + " |")

    a = record["analysis"]
    fr = [r["ddr_fraction"] for r in runs]
    overhead = [r["overhead_cycles"] / r["cycles"] for r in runs]
    notes = [f"On two ports the engine turns {100 * min(fr):.1f}-{100 * max(fr):.1f} % of the PYNQ-Z2's usable "
             f"{PYNQ_DDR_USABLE / 1e9:.3f} GB/s DDR into tokens; the serial steps (LayerNorm passes, per-head "
             f"softmax, descriptor and residual traffic) cost {100 * min(overhead):.1f}-{100 * max(overhead):.1f} % "
             f"of a token."]
    sp = a.get("speedup_over_one_port") or []
    if sp:
        notes.append(f"One 64-bit port carries {8 * PYNQ_CLOCK_HZ / 1e9:.3f} GB/s at 142.857 MHz; the second port "
                     f"makes tokens x{min(s['speedup'] for s in sp):.2f}-x{max(s['speedup'] for s in sp):.2f} faster "
                     f"(the DDR allows x{PYNQ_DDR_USABLE / (8 * PYNQ_CLOCK_HZ):.2f}).")
    over = {k: v["over_limit"] for k, v in a.get("serial_steps", {}).items() if v["over_limit"]}
    if over:
        notes.append(f"Serial steps above {100 * SERIAL_STEP_LIMIT:g} % of a token (LAYER 0's cycles beyond its "
                     f"beats at the DDR rate, x layers): "
                     + "; ".join(f"{k}: " + ", ".join(f"{b['step']} {100 * b['share_of_token']:.1f} %" for b in v)
                                 for k, v in over.items()) + ".")
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
