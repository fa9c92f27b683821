"""`gpt-fpga compare`: where does the integer model lose accuracy against float?

Runs the float model (checkpoint) and the fixed model (image) on the same tokens, captures every
intermediate of every layer, dequantizes the fixed ones with the image's scales, and reports
SNR (dB), cosine similarity and max abs error per layer and operation, plus the logits.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from gpt_fpga.contract.errors import InputError, writing
from gpt_fpga.contract import numerics as nx
from gpt_fpga.quantize.progress import progress
from gpt_fpga.quantize.text_input import read_text_file

OPS = ("ln1", "q", "k", "v", "ctx", "resid_attn", "ln2", "fc", "gelu", "resid_mlp")


def error_stats(ref, test) -> dict:
    ref, test = np.asarray(ref, np.float64).ravel(), np.asarray(test, np.float64).ravel()
    err = ref - test
    signal, noise = float(ref @ ref), float(err @ err)
    denom = math.sqrt(signal * float(test @ test))
    return {"snr_db": 10 * math.log10(signal / noise) if noise > 0 else float("inf"),
            "cosine": float(ref @ test) / denom if denom > 0 else 1.0,
            "max_abs_err": float(np.abs(err).max()) if err.size else 0.0}


def dequant_scale(header: dict, name: str, layer: int) -> float:
    if name in ("resid_attn", "resid_mlp"):
        return 2.0 ** -nx.RESID_FRAC
    if name == "lnf":
        return header["lnf_scale"]
    return header["layers"][layer]["scales"][name]


def capture(model, ids) -> dict:
    seen = {}

    def observe(name, layer, value):
        seen[(name, layer)] = np.array(value, dtype=np.float64)

    model.reset()
    logits = model.forward(ids, observe=observe)
    return seen, logits


def compare_models(float_model, fixed_model, header: dict, ids) -> dict:
    ref, ref_logits = capture(float_model, ids)
    fix, fix_logits = capture(fixed_model, ids)
    layers = []
    for layer in range(float_model.cfg.n_layer):
        row = {}
        for op in OPS:
            row[op] = error_stats(ref[(op, layer)], fix[(op, layer)] * dequant_scale(header, op, layer))
        layers.append(row)
    n = float_model.cfg.n_layer
    lnf = error_stats(ref[("lnf", n)], fix[("lnf", n)] * dequant_scale(header, "lnf", n))
    agree = float(np.mean(ref_logits.argmax(-1) == fix_logits.argmax(-1)))
    return {"tokens": len(ids), "layers": layers, "lnf": lnf, "logits": error_stats(ref_logits, fix_logits),
            "top1_agreement": agree}


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = summary["layers"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    x = np.arange(len(layers))
    for op in OPS:
        snr = [min(l[op]["snr_db"], 99) for l in layers]
        ax1.plot(x, snr, marker="o", label=op)
    ax1.axhline(summary["logits"]["snr_db"], color="k", ls="--", label="logits")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("SNR of fixed vs float (dB)")
    ax1.set_xticks(x)
    ax1.legend(ncol=2, fontsize=8)
    ax1.grid(alpha=0.3)
    ax1.set_title("per layer and operation")
    mean_snr = [np.mean([min(l[op]["snr_db"], 99) for l in layers]) for op in OPS]
    ax2.barh(list(OPS)[::-1], mean_snr[::-1], color="tab:blue")
    ax2.set_xlabel("mean SNR over layers (dB)")
    ax2.set_title(f"top-1 agreement {summary['top1_agreement']:.3f}, logits cos "
                  f"{summary['logits']['cosine']:.4f}")
    ax2.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(summary: dict, out_dir: Path) -> None:
    with writing(out_dir / "compare.json", "--out"):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.json").write_text(json.dumps(summary, indent=1))


def first_tokens(ids: list[int], tokens: int, n_ctx: int, text_path) -> list[int]:
    """The first `tokens` ids: more than the context is refused, a shorter text is said, not hidden."""
    if tokens > n_ctx:
        raise InputError(f"--tokens {tokens} exceeds the model's context of {n_ctx} tokens")
    if len(ids) < 2:
        raise InputError(f"--text {text_path}: needs at least 2 tokens, has {len(ids)}")
    if len(ids) < tokens:
        print(f"gpt-fpga compare: --text {text_path} has only {len(ids)} tokens; comparing those (--tokens {tokens})",
              file=sys.stderr)
    return ids[:tokens]


def compare(model_dir, image_path, text_path, out_dir, tokens: int = 256) -> dict:
    from gpt_fpga.host.backends import FixedBackend, FloatBackend

    text_path, out_dir = Path(text_path), Path(out_dir)
    text = read_text_file(text_path, "--text")  # before any work
    flt, fix = FloatBackend(Path(model_dir)), FixedBackend(Path(image_path))
    from gpt_fpga.quantize.quantizer import source_fingerprint

    if flt.config != fix.config or fix.model.image.header.get("source_fingerprint") != source_fingerprint(model_dir):
        raise InputError(f"{image_path} was not made from {model_dir} (their config or tensor layout differ); "
                         f"quantize this model to compare against it")
    if flt.codec is None:
        raise InputError(f"{model_dir} has no tokenizer.json: compare needs it to tokenize {text_path}")
    ids = first_tokens(flt.codec.encode(text), tokens, flt.config.n_ctx, text_path)
    summary = compare_models(flt.model, fix.model, fix.model.image.header, flt.check_ids(ids))
    summary.update(model=str(model_dir), image=str(image_path), text=str(text_path),
                   hardware=fix.model.image.header["hardware"])
    write_summary(summary, out_dir)
    with writing(out_dir / "compare.png", "--out"):
        plot(summary, out_dir / "compare.png", f"{Path(model_dir).name} vs {Path(image_path).name}")
    return summary


def compare_rtl(image_path, text_path: Path, out_dir: Path, tokens: int, backend: str = "rtl",
                overlay=None) -> dict:
    """The engine (RTL simulation, or the board), through the driver, against the fixed model: every
    layer's residual and the logits of every position must be equal. Writes compare.json; names the
    first difference."""
    from gpt_fpga.host.backends import FixedBackend, open_backend

    if Path(image_path).is_dir():
        raise InputError(f"{image_path}: is a directory (a Hugging Face model?); compare --backend {backend} "
                         f"takes a weight image, the file made by 'gpt-fpga quantize MODEL -o IMAGE'")
    text = read_text_file(text_path, "--text")  # before any work
    fixed = FixedBackend(Path(image_path))
    if fixed.codec is None:
        raise InputError(f"{image_path} has no embedded tokenizer: compare needs one to tokenize {text_path}")
    ids = first_tokens(fixed.codec.encode(text), tokens, fixed.config.n_ctx, text_path)
    rtl = open_backend(backend, Path(image_path), **({"overlay": overlay} if backend == "pynq" else {}))
    model, driver = fixed.model, rtl.model
    model.reset(), driver.reset()
    n_layer = fixed.config.n_layer
    layers = [{"layer": i, "equal_positions": 0, "first_difference": None} for i in range(n_layer)]
    logits = {"equal_positions": 0, "first_difference": None}
    first = None
    for pos, tok in enumerate(progress(ids, desc=f"{backend} vs fixed", unit="token")):
        x = model.embed([tok], pos)
        want = []
        for layer in range(n_layer):
            x = model.block(x, layer, pos)
            want.append(x[0])
        model.length = pos + 1
        want_logits = model.head(model.lnf(x, model.eps_table), nx.RESID_BITS)[0]

        def observe(layer, got, pos=pos, want=want):
            entry = layers[layer]
            diff = np.nonzero(got != want[layer])[0]
            if len(diff):
                j = int(diff[0])
                if entry["first_difference"] is None:
                    entry["first_difference"] = {"position": pos, "index": j, "rtl": int(got[j]),
                                                 "fixed": int(want[layer][j]), "count": int(len(diff))}
            else:
                entry["equal_positions"] += 1

        got_logits = driver.step(int(tok), observe=observe)
        diff = np.nonzero(got_logits != want_logits)[0]
        if len(diff):
            if logits["first_difference"] is None:
                j = int(diff[0])
                logits["first_difference"] = {"position": pos, "index": j, "rtl": int(got_logits[j]),
                                              "fixed": int(want_logits[j]), "count": int(len(diff))}
        else:
            logits["equal_positions"] += 1
        if first is None:
            for entry in layers:
                if entry["first_difference"] and entry["first_difference"]["position"] == pos:
                    first = dict(entry["first_difference"], where=f"layer {entry['layer']} residual")
                    break
            else:
                if logits["first_difference"]:
                    first = dict(logits["first_difference"], where="logits")
    identical = first is None
    if identical:
        verdict = (f"{backend} == fixed: every layer's residual and every logit equal at all {len(ids)} positions "
                   f"({n_layer} layers)")
    else:
        verdict = (f"{backend} != fixed: first difference in the {first['where']} at position {first['position']}, "
                   f"element {first['index']}: {backend} {first['rtl']}, fixed {first['fixed']} "
                   f"({first['count']} elements differ there)")
    summary = {"backend": backend, "reference": "fixed", "image": str(image_path), "tokens": len(ids),
               "identical": identical, "first_difference": first, "layers": layers, "logits": logits,
               "verdict": verdict}
    write_summary(summary, out_dir)
    return summary
