"""Accuracy and speed of the fixed-point model against float (sections of `make bench`).

accuracy
    Held-out perplexity of --backend fixed vs --backend float on the bundled trained models, for
    int8 and int4 weights, plus top-1 next-token agreement, plus the static-vs-dynamic activation
    scale study. Images are made with the default calibration (self-generated text), as a user gets.
fixed
    Decode ms/token of the fixed model vs the float model, side by side on a random model of
    TinyStories-33M shape, and `gpt-fpga quantize` wall time on a GPT-2-124M-shaped checkpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = ("neo-kjv", "gpt2-kjv")
HELDOUT = REPO / "models" / "kjv-heldout.txt"
STUDY_TOKENS = 8192


class _Top1Recorder:
    """Collects argmax predictions for each scored position of a perplexity run."""

    def __init__(self):
        self.pred = {}

    def __call__(self, first, end, logp):  # logp row j predicts token first + j
        for t in range(first, end):
            self.pred[t] = int(np.argmax(logp[t - first]))


def _ppl(backend, ids):
    from gpt_fpga.host.perplexity import perplexity

    rec = _Top1Recorder()
    r = perplexity(backend, ids, progress=True, on_window=rec)
    return r, rec.pred


def bench_accuracy(out: Path) -> dict:
    from gpt_fpga.host.backends import FixedBackend, FloatBackend
    from gpt_fpga.quantize.quantizer import quantize_checkpoint, self_generated_ids
    from gpt_fpga.bench.scale_study import scale_study

    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    result = {}
    for name in MODELS:
        model_dir = REPO / "models" / name
        flt = FloatBackend(model_dir)
        ids = flt.codec.encode(HELDOUT.read_text())
        float_r, float_pred = _ppl(flt, ids)
        entry = {}
        for fmt in ("int8", "int4"):
            img = tmp / f"{name}-{fmt}.img"
            quantize_checkpoint(model_dir, img, weights=fmt, group=32, progress=False)
            fix_r, fix_pred = _ppl(FixedBackend(img), ids)
            agree = np.mean([fix_pred[t] == float_pred[t] for t in float_pred])
            entry[fmt] = {"ppl": fix_r["perplexity"], "float_ppl": float_r["perplexity"],
                          "ratio": fix_r["perplexity"] / float_r["perplexity"], "top1_agreement": float(agree),
                          "tokens": fix_r["tokens"], "ctx": fix_r["ctx"], "stride": fix_r["stride"]}
        calib = self_generated_ids(flt.model, 512)
        study = scale_study(flt.config, flt.model.p, calib, ids[:STUDY_TOKENS])
        entry["activation_scale_study"] = dict(study, float=_ppl(flt, ids[:STUDY_TOKENS])[0]["perplexity"],
                                               tokens=STUDY_TOKENS, weights="float")
        result[name] = entry
    shutil.rmtree(tmp, ignore_errors=True)
    (out / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_accuracy(result, out / "accuracy.png")
    return result


def plot_accuracy(result: dict, path: Path) -> None:
    """Perplexity increase over float and top-1 agreement, per model and weight format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, fmts = list(result), ("int8", "int4")
    x = np.arange(len(models))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (fmt, bar) in enumerate(zip(fmts, (3.0, 8.0))):
        vals = [(result[m][fmt]["ratio"] - 1) * 100 for m in models]
        ax1.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=f"{fmt} (bar +{bar:g} %)")
        ax2.bar(x + (k - 0.5) * 0.38, [result[m][fmt]["top1_agreement"] for m in models], 0.38, label=fmt)
    ax1.axhline(1.0, color="tab:blue", ls=":", lw=1)
    ax1.axhline(4.0, color="tab:orange", ls=":", lw=1)
    ax1.set_ylabel("held-out perplexity vs float (%)")
    ax1.set_title("accuracy cost of the integer model (dotted: goals)")
    ax2.set_ylabel("top-1 agreement with float")
    ax2.set_ylim(0.8, 1.0)
    ax2.set_title("next-token agreement")
    for ax in (ax1, ax2):
        ax.set_xticks(x, models)
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _decode_ms(model, prompt, steps) -> float:
    model.reset()
    logits = model.forward(prompt)[-1]
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model.forward([int(np.argmax(logits))])[-1]
    return (time.perf_counter() - t0) * 1e3 / steps


def bench_fixed(out: Path) -> dict:
    """Fixed vs float decode on a TinyStories-33M-shaped random model, and quantize time at GPT-2 124M."""
    from gpt_fpga.quantize.checkpoint import load_checkpoint
    from gpt_fpga.contract.image import read_image
    from gpt_fpga.quantize.quantizer import quantize_checkpoint
    from gpt_fpga.bench.shapes import GPT2_124M, TINYSTORIES_33M
    from gpt_fpga.sim.fixed_model import FixedModel
    from gpt_fpga.sim.float_model import FloatModel
    from gpt_fpga.sim.random_checkpoint import random_tensors, write_checkpoint

    tmp = out / "tmp-fixed"
    tmp.mkdir(parents=True, exist_ok=True)
    # GPT-2-style init: weights and biases N(0, 0.02), LayerNorm gains 1
    write_checkpoint(tmp / "ts33m", TINYSTORIES_33M, random_tensors(TINYSTORIES_33M, std=0.02, ln_jitter=False))
    quantize_checkpoint(tmp / "ts33m", tmp / "ts33m.img", calib_tokens=64, progress=False)
    ckpt = load_checkpoint(tmp / "ts33m")
    flt, fix = FloatModel(ckpt.config, ckpt.params), FixedModel(read_image(tmp / "ts33m.img"))
    prompt = list(np.random.default_rng(0).integers(0, ckpt.config.vocab_size, 32))
    _decode_ms(flt, prompt, 4), _decode_ms(fix, prompt, 4)  # warm-up
    float_ms, fixed_ms = [], []
    for _ in range(3):  # alternate, so both see the same machine load
        float_ms.append(_decode_ms(flt, prompt, 32))
        fixed_ms.append(_decode_ms(fix, prompt, 32))
    write_checkpoint(tmp / "gpt2-124m", GPT2_124M, random_tensors(GPT2_124M, std=0.02, ln_jitter=False))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gpt_fpga.host.cli", "quantize", str(tmp / "gpt2-124m"), "-o",
                    str(tmp / "gpt2-124m.img")], check=True, cwd=REPO)
    quantize_s = time.perf_counter() - t0
    result = {"float": {"decode_ms_per_token": min(float_ms)}, "fixed": {"decode_ms_per_token": min(fixed_ms)},
              "fixed_to_float_speed": min(float_ms) / min(fixed_ms),
              "quantize_gpt2_124m_seconds": quantize_s, "model": "random TinyStories-33M shape, int8"}
    shutil.rmtree(tmp, ignore_errors=True)
    (out / "fixed.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
