"""Backends behind one interface: ``forward(ids) -> logits [n, vocab] float32``, with a KV cache.

``float``: the float32 golden model (sim/float_model.py) on a Hugging Face directory.
``fixed``: the bit-exact integer model of the accelerator (sim/fixed_model.py) on a weight image.
``rtl``: the engine's RTL (Verilator) driven by host/driver.py, the same driver the board uses.
``pynq``: the engine on the board (host/pynq_device.py, pynq), through the same driver.
Image backends also give ``forward_int(ids)``: the contract's int32 logits, compared by equality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt_fpga.contract.config import ModelConfig

from gpt_fpga.quantize.checkpoint import load_checkpoint
from gpt_fpga.contract.errors import GptFpgaError, InputError
from gpt_fpga.quantize.tokenizer import TextCodec

BACKENDS = ("float", "fixed", "rtl", "pynq")


class Backend:
    """A model with a KV cache: ``self.model`` has reset(), forward(ids) and position."""

    name: str
    config: ModelConfig
    codec: TextCodec | None

    def reset(self) -> None:
        self.model.reset()

    def recover(self) -> None:
        """After a failed request (a device error): the device back to idle, and a new sequence."""
        recover = getattr(self.model, "recover", None)  # the driver's; golden models have no device
        if recover is not None:
            recover()
        self.reset()

    def forward(self, ids) -> np.ndarray:  # [n] ids -> [n, vocab] float32 logits; extends the cache
        return self.model.forward(self.check_ids(ids))

    @property
    def position(self) -> int:
        return self.model.position

    def check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is out of range: the vocabulary has "
                             f"{self.config.vocab_size} ids (0..{self.config.vocab_size - 1})")
        return ids


class FloatBackend(Backend):
    name = "float"

    def __init__(self, model_dir: Path):
        from gpt_fpga.sim.float_model import FloatModel

        ckpt = load_checkpoint(model_dir)
        self.config = ckpt.config
        self.codec = TextCodec(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
        self.model = FloatModel(ckpt.config, ckpt.params)


def _read_image_file(image_path: Path, backend: str):
    from gpt_fpga.contract.image import read_image

    if Path(image_path).is_dir():
        raise GptFpgaError(f"{image_path}: is a directory (a Hugging Face model?); --backend {backend} takes a "
                           f"weight image, the file made by 'gpt-fpga quantize MODEL -o IMAGE'")
    return read_image(image_path)


def _image_codec(image, image_path) -> TextCodec | None:
    return TextCodec.from_bytes(image.section("tokenizer"), f"{image_path} (embedded tokenizer)") \
        if image.has_section("tokenizer") else None


class ImageBackend(Backend):
    """A backend on a weight image: also the contract's int32 logits."""

    def forward_int(self, ids) -> np.ndarray:  # [n] ids -> [n, vocab] int64 holding int32 logits
        return self.model.forward_int(self.check_ids(ids))


class FixedBackend(ImageBackend):
    """The bit-exact integer golden model on a weight image."""

    name = "fixed"

    def __init__(self, image_path: Path):
        from gpt_fpga.sim.fixed_model import FixedModel

        image = _read_image_file(image_path, self.name)
        self.model = FixedModel(image)
        self.config = self.model.cfg
        self.codec = _image_codec(image, image_path)


class RtlBackend(ImageBackend):
    """The engine's RTL in Verilator (host/rtl_device.py), through the board's driver (host/driver.py)."""

    name = "rtl"

    def __init__(self, image_path: Path, **device_kw):
        from gpt_fpga.host.driver import Driver
        from gpt_fpga.host.rtl_device import RtlDevice
        from gpt_fpga.sim.fixed_model import check_model_header

        image = _read_image_file(image_path, self.name)
        self.config = check_model_header(image.path, image.header)
        hw = image.hw
        self.device = RtlDevice(weights=hw.weights, group=hw.group, bus_bits=hw.bus_bits, **device_kw)
        self.model = Driver(image, self.device)
        self.codec = _image_codec(image, image_path)


class PynqBackend(ImageBackend):
    """The engine on a PYNQ board (host/pynq_device.py), through the driver (host/driver.py).

    `overlay`: the .bit (with its .hwh); default $GPT_FPGA_OVERLAY or build/overlay/gpt_fpga.bit."""

    name = "pynq"

    def __init__(self, image_path: Path, overlay: str | Path | None = None, **device_kw):
        from gpt_fpga.host.driver import Driver
        from gpt_fpga.host.pynq_device import PynqDevice
        from gpt_fpga.sim.fixed_model import check_model_header

        image = _read_image_file(image_path, self.name)
        self.config = check_model_header(image.path, image.header)
        self.device = PynqDevice(overlay, **device_kw)
        try:
            self.model = Driver(image, self.device)
        except BaseException:  # identity mismatch, no CMA, ...: give the buffers back before the error
            self.device.close()
            raise
        self.codec = _image_codec(image, image_path)


def open_backend(name: str, model: str | Path, overlay: str | Path | None = None) -> Backend:
    if overlay is not None and name != "pynq":
        raise InputError(f"--overlay applies to --backend pynq only (not {name})")
    if name == "pynq":
        return PynqBackend(Path(model), overlay)
    if name == "float":
        if Path(model).is_file():
            raise GptFpgaError(f"{model}: is a file; --backend float takes a Hugging Face model directory "
                               f"(use --backend fixed for a weight image)")
        return FloatBackend(Path(model))
    if name == "fixed":
        return FixedBackend(Path(model))
    if name == "rtl":
        return RtlBackend(Path(model))
    raise GptFpgaError(f"unknown backend '{name}' (available: {', '.join(BACKENDS)})")
