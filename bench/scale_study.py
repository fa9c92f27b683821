"""Static calibrated vs dynamic per-token int8 activation scales: the measurement behind the choice.

Both variants fake-quantize the same activations (every int8 tensor of the contract) inside the
float model, with float weights, so the difference is the activation-scale policy alone.
"""

from __future__ import annotations

import numpy as np

from gpt_fpga.host.perplexity import perplexity
from gpt_fpga.quantize.quantizer import CALIBRATED, act_scale, calibrate
from gpt_fpga.sim.float_model import FloatModel

QUANTIZED = CALIBRATED + ("lnf",)


def fake_quant(x, scale):
    return np.clip(np.floor(x / scale + 0.5), -128, 127) * scale


class FakeQuantBackend:
    """Float model whose int8-contract activations are rounded with a static or dynamic scale."""

    def __init__(self, model: FloatModel, mode: str, peaks: dict | None = None):
        self.model, self.mode, self.peaks = model, mode, peaks
        self.config, self.name = model.cfg, f"fakequant-{mode}"

    def observe(self, name, layer, value):
        if name not in QUANTIZED:
            return None
        if self.mode == "static":
            return fake_quant(value, np.float32(act_scale(self.peaks[name][layer]))).astype(np.float32)
        peak = np.abs(value).max(axis=-1, keepdims=True)  # one scale per token (per head row for q, k, v)
        return fake_quant(value, np.maximum(peak, 1e-6) / 127.0).astype(np.float32)

    def check_ids(self, ids):
        return list(ids)

    def reset(self):
        self.model.reset()

    def forward(self, ids):
        return self.model.forward(ids, observe=self.observe)


def scale_study(cfg, params, calib_ids, eval_ids, ctx: int | None = None) -> dict:
    model = FloatModel(cfg, params)
    peaks = calibrate(model, calib_ids)
    out = {}
    for mode in ("static", "dynamic"):
        backend = FakeQuantBackend(FloatModel(cfg, params), mode, peaks)
        out[mode] = perplexity(backend, eval_ids, ctx, progress=False)["perplexity"]
    return out
