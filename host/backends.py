"""Backends behind one interface: ``forward(ids) -> logits [n, vocab] float32``, with a KV cache.

``float``: the float32 golden model (sim/float_model.py) on a Hugging Face directory.
``fixed``: the bit-exact integer model of the accelerator (sim/fixed_model.py) on a weight image.
Later backends (rtl, pynq) take a weight image and present the same interface.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt_fpga.sim.contract.config import ModelConfig

from gpt_fpga.quantize.checkpoint import load_checkpoint
from gpt_fpga.sim.contract.errors import GptFpgaError, InputError
from gpt_fpga.quantize.tokenizer import TextCodec

BACKENDS = ("float", "fixed")


class Backend:
    """A model with a KV cache: ``self.model`` has reset(), forward(ids) and position."""

    name: str
    config: ModelConfig
    codec: TextCodec | None

    def reset(self) -> None:
        self.model.reset()

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


class FixedBackend(Backend):
    """The bit-exact integer golden model on a weight image."""

    name = "fixed"

    def __init__(self, image_path: Path):
        from gpt_fpga.sim.contract.image import read_image
        from gpt_fpga.sim.fixed_model import FixedModel

        if Path(image_path).is_dir():
            raise GptFpgaError(f"{image_path}: is a directory (a Hugging Face model?); a weight image is the "
                               f"file made by 'gpt-fpga quantize MODEL -o IMAGE'")
        image = read_image(image_path)
        self.model = FixedModel(image)
        self.config = self.model.cfg
        self.codec = TextCodec.from_bytes(image.section("tokenizer"), f"{image_path} (embedded tokenizer)") \
            if image.has_section("tokenizer") else None


def open_backend(name: str, model: str | Path) -> Backend:
    if name == "float":
        if Path(model).is_file():
            raise GptFpgaError(f"{model}: is a file; --backend float takes a Hugging Face model directory "
                               f"(use --backend fixed for a weight image)")
        return FloatBackend(Path(model))
    if name == "fixed":
        return FixedBackend(Path(model))
    raise GptFpgaError(f"unknown backend '{name}' (available: {', '.join(BACKENDS)})")
