"""`gpt-fpga board-check`: are this board, this overlay and this package one working whole?

Run on the board (as root, with the overlay from ``make bitstream``). It prints a table:

* **identity**: the engine's ID, register map, contract and image format versions against the installed
  package, and what the bitstream was built for (weights, bus width, maxima);
* **clock**: FCLK0 as pynq set it from the .hwh;
* **DMA read + write**: one HEAD command on a test image whose logits buffer was filled with a sentinel:
  the engine reads x and the lm_head from DDR and writes the logits, equal to the fixed model's;
* **read bandwidth**: the engine's read master in GB/s, from that HEAD's CYCLES and BEATS_READ and the
  clock (the lm_head is the largest weight stream of a model); on a two-port engine also **port 0
  alone** and **port 1 alone** (READ_PORTS), each HEAD's logits checked again, all three against the
  PYNQ-Z2's usable DDR bandwidth (1.785 GB/s): the first board run says whether the DDR gives what the
  projection assumes;
* **LAYER 0**: one LAYER command, its residual equal to the fixed model's;
* **decode**: a few tokens through every layer and the head, logits equal to the fixed model's;
* **interrupt**: one command waited for through the interrupt (engine -> axi_intc -> IRQ_F2P[0]) instead
  of STATUS.

The test image is ``--image`` or, by default, a small random GPT-2 (2 layers, d_model up to 128, vocab
8192: a 1 MiB lm_head at int8) quantized on the spot for the weights, group and bus width the engine
reports, so it always matches the bitstream. The exit code is 0 when no check failed, 1 otherwise, 2
for a one-line error before any check (not on a board, no overlay, ...).
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_fpga.host.driver import Driver, EngineError, engine_ports, read_identity
from gpt_fpga.contract import numerics as nx
from gpt_fpga.contract import registers as rm
from gpt_fpga.contract.errors import GptFpgaError
from gpt_fpga.contract.image import FORMAT_VERSION, read_image

REG = rm.register
CHECK_VOCAB = 8192  # the test model's vocabulary: its lm_head is the weight-heavy command
CHECK_LAYERS = 2
CHECK_TOKENS = 4
SENTINEL = 0xA5  # fills the logits buffer before the DMA check: stale data cannot pass for the engine's
IRQ_TIMEOUT_S = 1.0
USABLE_DDR_GBS = 1.785  # PYNQ-Z2: 16-bit DDR3-1050 (2.1 GB/s peak) x 0.85, what the projections assume
READ_PORTS_ONLY = {"port 0 alone": 1, "port 1 alone": 2}


@dataclass
class Row:
    check: str
    result: str  # ok | FAIL | warn | info | skip
    detail: str


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpt-fpga")
    except PackageNotFoundError:
        return "unknown"


# ---- the test image ---------------------------------------------------------------------------------
def check_model_shape(ident: dict) -> dict:
    """make_config arguments of a small GPT-2 the engine (its identity registers) can run."""
    hw = ident["HW_CONFIG"]
    group = hw["group"] if hw["weights"] == rm.WEIGHT_CODES["int4"] else 1
    max_d, max_hd, max_ctx = ident["MAX_D_IN"], ident["MAX_HEAD_DIM"], ident["MAX_CONTEXT"]
    hd = min(32, max_hd)
    for d in (128, 64, 32, 16):
        if d > max_d or d % max(hd, 1) or d % group:
            continue
        for d_ff in (4 * d, 2 * d, d):
            if d_ff <= max_d and d_ff % group == 0:
                return dict(vocab=CHECK_VOCAB, d=d, heads=d // hd, layers=CHECK_LAYERS, n_ctx=min(16, max_ctx),
                            d_ff=d_ff)
    raise GptFpgaError(f"the engine's maxima (d_in {max_d}, head_dim {max_hd}) leave no room for a test model: "
                       f"give one with --image")


def build_check_image(ident: dict, out_dir: Path) -> Path:
    """A random GPT-2 quantized for the weights, group and bus width the engine reports; its path."""
    from gpt_fpga.quantize.quantizer import quantize_checkpoint
    from gpt_fpga.contract.layout import BUS_BITS_CHOICES
    from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint

    hw = ident["HW_CONFIG"]
    names = {code: name for name, code in rm.WEIGHT_CODES.items()}
    if hw["weights"] not in names or hw["bus_bits"] not in BUS_BITS_CHOICES:
        raise GptFpgaError(f"the engine reports weights code {hw['weights']} and a {hw['bus_bits']}-bit bus, which "
                           f"this package cannot make an image for: give one with --image")
    weights = names[hw["weights"]]
    cfg = make_config("gpt2", **check_model_shape(ident))
    model = write_checkpoint(Path(out_dir) / "check-model", cfg, random_tensors(cfg, seed=7))
    out = Path(out_dir) / f"check-{weights}.img"
    with contextlib.redirect_stderr(io.StringIO()):  # the quantizer's calibration note
        quantize_checkpoint(model, out, weights=weights, group=hw["group"] or 32, bus_bits=hw["bus_bits"],
                            calib_tokens=16, progress=False)
    return out


# ---- the checks -------------------------------------------------------------------------------------
def _identity_rows(ident: dict) -> tuple[list[Row], bool]:
    v, hw = ident["VERSION"], ident["HW_CONFIG"]
    rows = []
    good = ident["ID"] == rm.ENGINE_MAGIC
    rows.append(Row("engine ID", "ok" if good else "FAIL",
                    f"0x{ident['ID']:08x}" + ("" if good else f", expected 0x{rm.ENGINE_MAGIC:08x}: no gpt-fpga engine "
                                                                 f"answers at this address (wrong overlay?)")))
    for label, got, want in (("register map version", v["regmap"], rm.REGMAP_VERSION),
                             ("contract version", v["contract"], nx.CONTRACT_VERSION),
                             ("image format version", v["image_format"], FORMAT_VERSION)):
        same = got == want
        good &= same
        rows.append(Row(label, "ok" if same else "FAIL",
                        f"{got} (this package: {want})" + ("" if same else ": rebuild the bitstream (make bitstream) "
                                                                           "from this version, or install the matching "
                                                                           "gpt-fpga")))
    names = {code: name for name, code in rm.WEIGHT_CODES.items()}
    weights = names.get(hw["weights"], f"code {hw['weights']}")
    group = f" (group {hw['group']})" if hw["group"] else ""
    rows.append(Row("engine build", "info",
                    f"{weights} weights{group}, "
                    f"{hw['bus_bits']}-bit bus ({engine_ports(hw)}); d_in <= {ident['MAX_D_IN']}, context <= {ident['MAX_CONTEXT']}, "
                    f"head_dim <= {ident['MAX_HEAD_DIM']}"))
    return rows, good


def _first_difference(got, want, what: str) -> str:
    diff = np.nonzero(np.asarray(got) != np.asarray(want))[0]
    j = int(diff[0])
    return f"{len(diff)} of {len(want)} {what} differ from the fixed model (first: [{j}] engine {int(got[j])}, " \
           f"fixed {int(want[j])})"


def _dma_check(driver: Driver, model, tok: int) -> tuple[Row, dict | None]:
    """HEAD on the fixed model's final residual of `tok` at position 0; the logits region pre-filled."""
    model.reset()
    x = model.embed([tok], 0)
    for layer in range(model.cfg.n_layer):
        x = model.block(x, layer, 0)
    want = model.head(model.lnf(x, model.eps_table), nx.RESID_BITS)[0]
    lay = driver.state_layout
    driver.write_residual(x[0])
    driver._put(lay.logits, bytes([SENTINEL]) * (4 * driver.vocab))
    driver.state.flush()
    stats = driver.run(rm.OP_HEAD)
    got = driver.read_logits()
    untouched = np.frombuffer(bytes([SENTINEL]) * 4, "<i4")[0]
    if np.array_equal(got, want):
        return Row("DMA read + write", "ok", f"HEAD read x and the lm_head ({stats['beats_read']} beats) and wrote "
                   f"{driver.vocab} int32 logits ({stats['beats_written']} beats): equal to the fixed model"), stats
    if np.all(got == untouched):
        return Row("DMA read + write", "FAIL", "HEAD ended but the logits buffer still holds the host's sentinel: the "
                   "engine's writes do not reach this buffer (HP port address map, or the cache is not "
                   "invalidated)"), stats
    return Row("DMA read + write", "FAIL", "HEAD: " + _first_difference(got, want, "logits")), stats


def _bandwidth_row(stats: dict | None, bus_bytes: int, mhz: float | None, name: str = "read bandwidth",
                   port_bytes: int | None = None) -> Row:
    """The read bandwidth of one HEAD against what the port(s) carry at this clock and the usable DDR."""
    if stats is None:
        return Row(name, "skip", "no HEAD command ran")
    beats, cycles = stats["beats_read"], stats["cycles"]
    if not cycles or not beats:
        return Row(name, "FAIL", f"HEAD reported CYCLES {cycles} and BEATS_READ {beats}: the counters do not count")
    per_cycle = beats * bus_bytes / cycles
    if not mhz:
        return Row(name, "info", f"{per_cycle:.2f} bytes per cycle (HEAD: {beats} beats of {bus_bytes} B in {cycles} "
                   f"cycles; the clock is unknown)")
    port_bytes = port_bytes or bus_bytes
    gbs, peak = per_cycle * mhz * 1e6 / 1e9, port_bytes * mhz * 1e6 / 1e9
    return Row(name, "info", f"{gbs:.3f} GB/s (HEAD: {beats} beats of {bus_bytes} B in {cycles} cycles at {mhz:g} "
               f"MHz; {100 * gbs / peak:.0f}% of the {peak:.3f} GB/s the port(s) carry at this clock, "
               f"{100 * gbs / USABLE_DDR_GBS:.0f}% of the {USABLE_DDR_GBS} GB/s usable DDR)")


def _port_rows(dev, driver: Driver, model, tok: int, bus_bytes: int, mhz: float | None) -> list[Row]:
    """A two-port engine: HEAD through each port alone (READ_PORTS), logits checked each time; READ_PORTS
    is back at 0 (both ports) afterwards, whatever happens."""
    rows, reg = [], rm.register("READ_PORTS")
    try:
        for name, only in READ_PORTS_ONLY.items():
            dev.write_reg(reg.offset, reg.pack(only=only))
            try:
                row, stats = _dma_check(driver, model, tok)
            except EngineError as e:
                rows.append(Row(f"read bandwidth, {name}", "FAIL", str(e)))
                continue
            if row.result != "ok":
                rows.append(Row(f"read bandwidth, {name}", "FAIL", row.detail))
            else:
                rows.append(_bandwidth_row(stats, bus_bytes, mhz, f"read bandwidth, {name}", bus_bytes // 2))
    finally:
        dev.write_reg(reg.offset, reg.pack(only=0))
    return rows


def _layer_check(driver: Driver, model, tok: int) -> Row:
    driver.reset()
    model.reset()
    x0 = driver.embed(tok, 0)
    want = model.block(np.asarray(x0)[None], 0, 0)[0]
    driver.write_residual(x0)
    driver.state.flush()
    driver.device.write_reg(REG("POSITION").offset, 0)
    stats = driver.run(rm.OP_LAYER, 0)
    got = driver.read_residual()
    if np.array_equal(got, want):
        return Row("LAYER 0", "ok", f"position 0: the {driver.d} residual values equal the fixed model's "
                   f"({stats['cycles']} cycles, {stats['beats_read']} beats read, {stats['beats_written']} written)")
    return Row("LAYER 0", "FAIL", "position 0: " + _first_difference(got, want, "residual values"))


def _decode_check(driver: Driver, model, ids: list[int]) -> Row:
    driver.reset()
    model.reset()
    want = model.forward_int(ids)
    t0 = time.perf_counter()
    got = driver.forward_int(ids)
    ms = 1e3 * (time.perf_counter() - t0) / len(ids)
    what = f"{len(ids)} tokens through {driver.n_layer} layers and the head"
    for pos in range(len(ids)):
        if not np.array_equal(got[pos], want[pos]):
            return Row("decode", "FAIL", f"{what}: position {pos}: " + _first_difference(got[pos], want[pos], "logits"))
    return Row("decode", "ok", f"{what}: logits equal the fixed model's ({ms:.1f} ms per token, host included)")


def _irq_check(dev, driver: Driver) -> Row:
    if dev.irq is None:
        return Row("interrupt", "warn", f"{dev.irq_problem}; the driver polls STATUS, so decoding works without it")
    w = dev.write_reg
    w(REG("IRQ_STATUS").offset, REG("IRQ_STATUS").pack(done=1))
    w(REG("COMMAND").offset, REG("COMMAND").pack(op=rm.OP_HEAD, layer=0))
    t0 = time.perf_counter()
    w(REG("CONTROL").offset, REG("CONTROL").pack(start=1))
    arrived = dev.wait_irq(max(IRQ_TIMEOUT_S, driver.timeouts["HEAD"]))
    us = 1e6 * (time.perf_counter() - t0)
    done = dev.poll(IRQ_TIMEOUT_S)
    if not done:
        w(REG("CONTROL").offset, REG("CONTROL").pack(abort=1))
        dev.poll(IRQ_TIMEOUT_S)
    w(REG("IRQ_STATUS").offset, REG("IRQ_STATUS").pack(done=1))
    if arrived and done:
        return Row("interrupt", "ok", f"a HEAD's interrupt arrived {us:.0f} us after its start "
                   f"(IRQ_F2P through pynq's Interrupt)")
    if done:
        return Row("interrupt", "FAIL", f"the HEAD ended (STATUS.done) but no interrupt arrived within "
                   f"{IRQ_TIMEOUT_S:g} s: check that the engine's interrupt reaches the axi_intc's intr and its irq "
                   f"IRQ_F2P[0], both level-high "
                   f"(the driver polls STATUS, so decoding still works)")
    return Row("interrupt", "FAIL", "the HEAD did not end within 1 s (aborted)")


def run_checks(dev, image_path=None, progress=None) -> list[Row]:
    """Every check on an open device (a PynqDevice), as rows; a failed one does not stop the others
    unless they depend on it."""
    say = progress or (lambda msg: None)
    ident = read_identity(dev.read_reg)
    rows, ident_ok = _identity_rows(ident)
    mhz = dev.fclk0_mhz
    rows.append(Row("clock (FCLK0)", "info", f"{mhz:g} MHz, as pynq set it from the .hwh" if mhz else
                    "pynq could not read FCLK0"))
    later = ("test image", "DMA read + write", "read bandwidth", "LAYER 0", "decode", "interrupt")
    if not ident_ok:
        return rows + [Row(name, "skip", "the engine does not match this package") for name in later]
    with tempfile.TemporaryDirectory(prefix="gpt-fpga-board-check-") as tmp:
        if image_path is None:
            say("building a test image for the engine")
            image_path = build_check_image(ident, Path(tmp))
            source = "built"
        else:
            source = "given"
        image = read_image(image_path)
        from gpt_fpga.sim.fixed_model import FixedModel, check_model_header

        cfg = check_model_header(image.path, image.header)
        hwh = image.header["hardware"]
        rows.append(Row("test image", "info", f"{source}: {Path(image_path).name}, {cfg.family} {cfg.n_layer} layers, "
                        f"d_model {cfg.d_model}, vocab {cfg.vocab_size}, {hwh['weights']}, {hwh['bus_bits']}-bit "
                        f"({Path(image_path).stat().st_size / 2**20:.1f} MiB)"))
        try:
            driver = Driver(image, dev)
        except GptFpgaError as e:  # the image does not match the engine, or no contiguous memory
            return rows + [Row("DMA read + write", "FAIL", str(e))] + \
                [Row(name, "skip", "the test image could not be loaded") for name in later[2:]]
        model = FixedModel(image)
    tok = 1 % cfg.vocab_size
    stats = None
    try:
        say("HEAD (DMA read + write)")
        row, stats = _dma_check(driver, model, tok)
        rows.append(row)
    except EngineError as e:
        rows.append(Row("DMA read + write", "FAIL", str(e)))
    rows.append(_bandwidth_row(stats, image.hw.bus_bytes, mhz))
    if ident["HW_CONFIG"]["ports"] == 2 and stats is not None:
        say("HEAD through each port alone")
        rows += _port_rows(dev, driver, model, tok, image.hw.bus_bytes, mhz)
    for name, check in (("LAYER 0", lambda: _layer_check(driver, model, tok)),
                        ("decode", lambda: _decode_check(driver, model, [(tok + 3 * i) % cfg.vocab_size for i in
                                                                         range(min(CHECK_TOKENS, cfg.n_ctx))])),
                        ("interrupt", lambda: _irq_check(dev, driver))):
        say(name)
        try:
            rows.append(check())
        except EngineError as e:
            rows.append(Row(name, "FAIL", str(e)))
    return rows


def format_table(rows: list[Row]) -> str:
    w = max(len(r.check) for r in rows)
    lines = [f"{'check':<{w}}  {'result':<6}  detail", f"{'-' * w}  {'-' * 6}  {'-' * 6}"]
    lines += [f"{r.check:<{w}}  {r.result:<6}  {r.detail}" for r in rows]
    failed = sum(r.result == "FAIL" for r in rows)
    passed = sum(r.result == "ok" for r in rows)
    lines.append("")
    lines.append(f"{passed} ok, {failed} failed" + (": the board, the overlay and this package agree" if not failed
                                                      else ""))
    return "\n".join(lines)


def board_check(overlay=None, image=None, out=None, **device_kw) -> bool:
    """Open the board (one-line errors off it), run every check, print the table; True when none failed."""
    from gpt_fpga.host.pynq_device import PynqDevice

    out = out or sys.stdout
    dev = PynqDevice(overlay, **device_kw)
    try:
        rows = run_checks(dev, image, progress=lambda msg: print(f"board-check: {msg}", file=sys.stderr))
    finally:
        dev.close()
    print(f"gpt-fpga {_package_version()} board check: overlay {dev.bit}, engine {dev.ip_name} at "
          f"0x{dev.base:08x}, pynq {dev.pynq_version}", file=out)
    print(format_table(rows), file=out)
    return not any(r.result == "FAIL" for r in rows)
