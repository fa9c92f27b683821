"""The host driver's off-device steps (host/driver.py): the embedding, the identity check, and how a
command that fails or never ends is reported. The driver against the real engine is in
tests/test_rtl_backend.py (Verilator).

The register-level device here answers only what these tests need (identity registers, a STATUS that
never clears or an ERROR word); it is not a model of the engine.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpt_fpga.host.driver import Driver, EngineError, check_identity, embed, read_identity
from gpt_fpga.quantize.quantizer import quantize_checkpoint
from gpt_fpga.contract import numerics as nx
from gpt_fpga.contract import registers as rm
from gpt_fpga.contract.image import FORMAT_VERSION, read_image
from gpt_fpga.contract.layout import unpack_embed_scale
from gpt_fpga.sim.fixed_model import FixedModel
from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint

REG = rm.register


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("driver")
    made = {}
    for name, family, weights, kw in (
            ("neo-int8", "gpt_neo", "int8", dict(vocab=61, d=40, heads=5, layers=2, n_ctx=12, d_ff=72,
                                                 attention_types=[[["local", "global"], 1]], window_size=4)),
            ("gpt2-int4", "gpt2", "int4", dict(vocab=45, d=64, heads=4, layers=1, n_ctx=10, d_ff=96))):
        cfg = make_config(family, **kw)
        model = write_checkpoint(out / name, cfg, random_tensors(cfg, seed=5))
        quantize_checkpoint(model, out / f"{name}.img", weights=weights, calib_tokens=16, progress=False)
        made[name] = read_image(out / f"{name}.img")
    return made


def identity_for(header: dict, **changes) -> dict:
    """The identity registers an engine built for this image would show (then `changes`)."""
    hw = header["hardware"]
    regs = {"ID": rm.ENGINE_MAGIC,
            "VERSION": REG("VERSION").pack(contract=header["contract_version"], image_format=FORMAT_VERSION,
                                           regmap=rm.REGMAP_VERSION),
            "HW_CONFIG": REG("HW_CONFIG").pack(bus_bits=hw["bus_bits"], weights=rm.WEIGHT_CODES[hw["weights"]],
                                               group=hw["group"] if hw["weights"] == "int4" else 0, ports=1),
            "MAX_D_IN": nx.MAX_D_IN, "MAX_CONTEXT": nx.MAX_CONTEXT, "MAX_HEAD_DIM": nx.MAX_HEAD_DIM}
    regs.update(changes)
    return regs


class RegisterDevice:
    """Registers in a dict, buffers in host memory; STATUS and ERROR as the test sets them."""

    class Buf(np.ndarray):
        def flush(self):
            self.owner.log.append(("flush", self.device_address))

        def invalidate(self):
            self.owner.log.append(("invalidate", self.device_address))

    def __init__(self, regs: dict, finishes: bool = False, status: int = 0, error: int = 0, step: int = 0):
        self.regs = {REG(k).offset: v for k, v in regs.items()}
        self.regs.update({REG("STATUS").offset: status, REG("ERROR").offset: error, REG("STEP").offset: step})
        self.finishes, self.log, self.next_addr = finishes, [], 0x1000_0000

    def read_reg(self, offset):
        return self.regs.get(offset, 0)

    def write_reg(self, offset, value):
        self.log.append(("write", offset, value))

    def allocate(self, nbytes):
        buf = np.zeros(nbytes, np.uint8).view(self.Buf)
        buf.device_address, buf.owner = self.next_addr, self
        self.next_addr += -(-nbytes // 4096) * 4096
        return buf

    def wait_interrupt(self, timeout_s):
        self.log.append(("wait", timeout_s))
        return self.finishes

    def close(self):
        pass


@pytest.mark.parametrize("name", ["neo-int8", "gpt2-int4"])
def test_embedding_equals_fixed_model(images, name):
    image = images[name]
    model = FixedModel(image)
    cfg, hw = model.cfg, image.hw
    mult, shift = unpack_embed_scale(image.section("embed_scale"), cfg.vocab_size)
    for pos in (0, 3, cfg.n_ctx - 1):
        for tok in range(cfg.vocab_size):
            got = embed(image.section("lm_head"), mult, shift, image.section("wpe"), tok, pos, cfg.d_model, hw)
            assert np.array_equal(got, model.embed([tok], pos)[0]), (tok, pos)


def test_identity_matches_and_mismatches_are_named(images):
    h = images["gpt2-int4"].header
    check_identity(identity_for(h) | {"VERSION": REG("VERSION").unpack(identity_for(h)["VERSION"]),
                                      "HW_CONFIG": REG("HW_CONFIG").unpack(identity_for(h)["HW_CONFIG"])}, h)
    cases = {
        "weights int8": dict(HW_CONFIG=REG("HW_CONFIG").pack(bus_bits=64, weights=0, group=0, ports=1)),
        "group 64": dict(HW_CONFIG=REG("HW_CONFIG").pack(bus_bits=64, weights=1, group=64, ports=1)),
        "bus width 128 bits on 1 port of 128 bits .the image is tiled for 64: a one-port engine":
            dict(HW_CONFIG=REG("HW_CONFIG").pack(bus_bits=128, weights=1, group=32, ports=1)),
        "bus width 128 bits on 2 ports of 64 bits .the image is tiled for 64: a one-port engine":
            dict(HW_CONFIG=REG("HW_CONFIG").pack(bus_bits=128, weights=1, group=32, ports=2)),
        "2 read port.s. at 64 bits .this driver knows": dict(HW_CONFIG=REG("HW_CONFIG").pack(
            bus_bits=64, weights=1, group=32, ports=2)),
        "0 read port.s. at 64 bits": dict(HW_CONFIG=REG("HW_CONFIG").pack(bus_bits=64, weights=1, group=32)),
        "register map version 1 .this driver speaks 2.": dict(VERSION=REG("VERSION").pack(
            contract=h["contract_version"], image_format=FORMAT_VERSION, regmap=1)),
        "integer contract version 9": dict(VERSION=REG("VERSION").pack(contract=9, image_format=FORMAT_VERSION,
                                                                        regmap=rm.REGMAP_VERSION)),
        "at most 32 inputs per matvec": dict(MAX_D_IN=32),
        "a context of at most 8": dict(MAX_CONTEXT=8),
        "head_dim at most 8": dict(MAX_HEAD_DIM=8),
        "no gpt-fpga engine": dict(ID=0xDEADBEEF),
    }
    for phrase, change in cases.items():
        dev = RegisterDevice(identity_for(h, **change))
        with pytest.raises(EngineError, match=phrase):
            check_identity(read_identity(dev.read_reg), h)
        with pytest.raises(EngineError, match=phrase):
            Driver(images["gpt2-int4"], dev)


def test_identity_ports_of_a_128_bit_image(images):
    """A 128-bit image runs on a two-port (or one-port) 128-bit engine; on a 64-bit engine the error
    names both sides: the engine's ports and widths, and the engine the image needs."""
    h = images["gpt2-int4"].header
    h128 = dict(h, hardware=dict(h["hardware"], bus_bits=128))

    def ident(**hw_config):
        return read_identity(RegisterDevice(identity_for(h, HW_CONFIG=REG("HW_CONFIG").pack(**hw_config))).read_reg)

    group = h["hardware"]["group"]
    check_identity(ident(bus_bits=128, weights=1, group=group, ports=2), h128)
    check_identity(ident(bus_bits=128, weights=1, group=group, ports=1), h128)
    with pytest.raises(EngineError, match=r"the engine does not match the image: it has bus width 64 bits on 1 port "
                                          r"of 64 bits \(the image is tiled for 128: the two-port engine\)"):
        check_identity(ident(bus_bits=64, weights=1, group=group, ports=1), h128)


def test_driver_places_image_and_descriptors(images):
    image = images["neo-int8"]
    dev = RegisterDevice(identity_for(image.header))
    drv = Driver(image, dev)
    # the weights buffer holds every section at its header offset
    for s in image.header["sections"]:
        addr = drv.place.sections[s["name"]] - drv.weights.device_address
        assert drv.weights[addr:addr + s["size"]].tobytes() == image.section(s["name"]), s["name"]
    writes = {off: v for kind, *rest in dev.log if kind == "write" for off, v in [rest]}
    assert writes[REG("DESC_ADDR").offset] == drv.desc_addr
    assert ("flush", drv.weights.device_address) in dev.log and ("flush", drv.state.device_address) in dev.log


def test_timeout_names_the_command_and_aborts(images):
    image = images["neo-int8"]
    dev = RegisterDevice(identity_for(image.header), finishes=False,
                         status=REG("STATUS").pack(busy=1), step=REG("STEP").pack(step=rm.STEPS.index("qkv")))
    drv = Driver(image, dev, timeout_s=0.5)
    with pytest.raises(EngineError) as e:
        drv.step(3)
    msg = str(e.value)
    assert "LAYER 0 at position 0 did not finish within 0.5 s" in msg and "busy=1" in msg and "step qkv" in msg
    assert ("write", REG("CONTROL").offset, REG("CONTROL").pack(abort=1)) in dev.log
    assert drv.position == 0  # a failed token does not advance


def test_error_bits_are_named(images):
    image = images["neo-int8"]
    dev = RegisterDevice(identity_for(image.header), finishes=True, status=REG("STATUS").pack(done=1, error=1),
                         error=REG("ERROR").pack(axi_read=1),
                         step=REG("STEP").pack(step=rm.STEPS.index("scores_softmax"), head=2))
    drv = Driver(image, dev)
    with pytest.raises(EngineError, match=r"LAYER 0 at position 0 ended with error axi_read \(step scores_softmax, "
                                          r"head 2\): a read response was SLVERR"):
        drv.step(1)


def test_bad_token_and_full_context_are_refused(images):
    image = images["neo-int8"]
    drv = Driver(image, RegisterDevice(identity_for(image.header), finishes=True, status=REG("STATUS").pack(done=1)))
    with pytest.raises(Exception, match="out of range"):
        drv.step(image.header["config"]["vocab_size"])
    drv.length = image.header["config"]["n_ctx"]
    with pytest.raises(Exception, match="beyond the model's context"):
        drv.step(0)
