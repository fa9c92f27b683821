"""The `gpt-fpga` command line. Every user error exits 2 with a one-line message, no traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from gpt_fpga.contract.errors import GptFpgaError, InputError, writing
from gpt_fpga.quantize.text_input import check_text_arg, read_text_file


def parse_ids(text: str) -> list[int]:
    if not text.strip():
        return []  # the caller says what an empty list means
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        return []
    if any(not p.lstrip("-").isascii() or not p.lstrip("-").isdigit() for p in parts):
        raise InputError(f"--ids must be comma-separated integers like 1,2,3, got '{text}'")
    return [int(p) for p in parts]


def output_file(path: str, what: str) -> Path:
    """An output file path that is not a directory, with its folder created."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{what} {out}: is a directory; give the file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{what} {out}: cannot create its folder: {e.strerror}") from None
    return out


def check_writable(path: Path, what: str):
    """Fail before long work, not after it."""
    probe = path.with_name(path.name + ".partial")
    try:
        probe.open("wb").close()
        probe.unlink()
    except OSError as e:
        raise InputError(f"{what} {path}: cannot write there: {e.strerror}") from None


def _open(args):
    from gpt_fpga.host.backends import open_backend

    return open_backend(args.backend, args.model, overlay=getattr(args, "overlay", None))


def _input_ids(backend, args) -> list[int]:
    if args.ids is not None:
        return backend.check_ids(parse_ids(args.ids))
    if backend.codec is None:
        raise InputError(f"{args.model} has no tokenizer (tokenizer.json): use --ids instead of --prompt")
    return backend.codec.encode(args.prompt)


def cmd_generate(args):
    from gpt_fpga.host.generate import Sampling, check_context, generate
    from gpt_fpga.quantize.tokenizer import StreamDecoder

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    sampling.validate()
    if args.prompt is not None:
        check_text_arg(args.prompt, "--prompt")
    backend = _open(args)
    if args.top_k is not None and args.top_k > backend.config.vocab_size:
        raise InputError(f"--top-k {args.top_k} exceeds the vocabulary of {backend.config.vocab_size} tokens")
    ids = _input_ids(backend, args)
    check_context(backend, len(ids), args.max_new_tokens)
    if backend.codec is not None:
        stream = StreamDecoder(backend.codec, ids)
        sys.stdout.write(backend.codec.decode(ids))
        on_token = lambda t: (sys.stdout.write(stream.push(t)), sys.stdout.flush())  # noqa: E731
    else:
        on_token = lambda t: (sys.stdout.write(f"{t} "), sys.stdout.flush())  # noqa: E731
    generate(backend, ids, args.max_new_tokens, sampling, on_token)
    if backend.codec is not None:
        sys.stdout.write(stream.flush())
    sys.stdout.write("\n")


def cmd_logits(args):
    backend = _open(args)
    ids = backend.check_ids(parse_ids(args.ids))
    if not ids:
        raise InputError("--ids is empty")
    if len(ids) > backend.config.n_ctx:
        raise InputError(f"{len(ids)} ids exceed the model's context of {backend.config.n_ctx} tokens")
    out = output_file(args.out, "--out")
    check_writable(out, "--out")
    backend.reset()
    if args.int32:
        if not hasattr(backend, "forward_int"):
            raise InputError(f"--int32 needs an image backend (fixed, rtl): the {backend.name} backend has no "
                             f"integer logits")
        logits = backend.forward_int(ids).astype(np.int32)
    else:
        logits = backend.forward(ids).astype(np.float32)
    with writing(out, "--out"), open(out, "wb") as f:  # exactly this path: np.save(str) would append .npy
        np.save(f, logits)
    print(f"wrote {out}: {logits.dtype} {list(logits.shape)}"
          + (" (value = int / 2**16)" if args.int32 else ""), file=sys.stderr)


def cmd_perplexity(args):
    from gpt_fpga.host.perplexity import perplexity

    text = read_text_file(args.text, "--text")  # before any work
    backend = _open(args)
    if backend.codec is None:
        raise InputError(f"{args.model} has no tokenizer.json: perplexity needs one to tokenize {args.text}")
    ids = backend.codec.encode(text)
    result = perplexity(backend, ids, args.ctx, args.stride, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
              f"(ctx {result['ctx']}, stride {result['stride']}, backend {result['backend']})")


def model_info(model: str) -> dict:
    """Shape, parameters and DDR bytes per decoded token of a model directory or a weight image."""
    from gpt_fpga.contract.config import load_config
    from gpt_fpga.contract.layout import HwLayout, decode_bytes_per_token

    path = Path(model)
    image = None
    if path.is_file():
        from gpt_fpga.contract.image import read_image
        from gpt_fpga.sim.fixed_model import check_model_header

        image = read_image(path)
        cfg = check_model_header(path, image.header)
        layouts = {image.hw.weights: image.hw}
    elif path.is_dir():
        cfg = load_config(path)
        layouts = {fmt: HwLayout(bus_bits=64, weights=fmt) for fmt in ("int8", "int4")}
    else:
        raise InputError(f"{path}: no such model directory or weight image")
    info = {"family": cfg.family, "layers": cfg.n_layer, "d_model": cfg.d_model, "heads": cfg.n_head,
            "head_dim": cfg.head_dim, "d_ff": cfg.d_ff, "vocab": cfg.vocab_size, "n_ctx": cfg.n_ctx,
            "window_size": cfg.window_size, "local_layers": [i for i, l in enumerate(cfg.local_layers) if l],
            "params": cfg.param_count(),
            "bytes_per_token": {fmt: decode_bytes_per_token(cfg, hw) for fmt, hw in layouts.items()}}
    if image is not None:
        # clips: {tensor: {kind: count}} from the quantizer, {} if nothing clipped, None for images made
        # before the counts were recorded (unknown)
        # rounding: {"method", "lm_head", ...} from the quantizer, None for images made before it was recorded
        info.update(image={"hardware": image.header["hardware"], "calibration": image.header.get("calibration"),
                           "file_bytes": path.stat().st_size, "clips": image.header.get("clips"),
                           "rounding": image.header.get("rounding")})
    return info


def rounding_text(r: dict | None) -> str:
    if r is None:
        return "nearest (the image predates the rounding record)"
    if r["method"] == "nearest":
        return "nearest"
    raised = "".join(f"; damping raised to {v} for {t}" if v is not None else f"; {t} fell back to nearest"
                     for t, v in r["damping_raised"].items())
    head = f" (damping {r['lm_head_damping']:g})" if "lm_head_damping" in r else ""
    return (f"gptq (error-compensating), damping {r['damping']:g} of H's mean diagonal, {r['calib_tokens']} "
            f"calibration tokens, lm_head {r['lm_head']}{head}{raised}")


def cmd_info(args):
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info))
        return
    for k in ("family", "layers", "d_model", "heads", "head_dim", "d_ff", "vocab", "n_ctx", "window_size",
              "local_layers"):
        print(f"{k:>14}: {info[k]}")
    print(f"{'params':>14}: {info['params']:,}")
    if "image" in info:
        im = info["image"]
        hw, cal = im["hardware"], im["calibration"] or {}
        print(f"{'image':>14}: {im['file_bytes']:,} bytes, {hw['weights']}"
              + (f" group {hw['group']}" if hw["weights"] == "int4" else "") + f", {hw['bus_bits']}-bit beats")
        print(f"{'calibration':>14}: " + (f"{cal.get('tokens')} tokens ({cal.get('source')}, {cal.get('method')})"
                                           if cal else "unknown"))
        print(f"{'rounding':>14}: {rounding_text(im['rounding'])}")
        clips = im["clips"]
        if clips is None:
            print(f"{'clips':>14}: unknown (the image predates clip counts)")
        elif not clips:
            print(f"{'clips':>14}: none (no value saturated or clamped during quantization)")
        for n, (tensor, kinds) in enumerate((clips or {}).items()):
            print(f"{'clips' if n == 0 else '':>14}{':' if n == 0 else ' '} {tensor}: "
                  + ", ".join(f"{kind} {count}" for kind, count in kinds.items()))
    for fmt, b in info["bytes_per_token"].items():
        print(f"{fmt + ' bytes/tok':>14}: {b['total']:,} at position {b['position']} "
              f"(weights {b['weights']:,}, lm_head {b['lm_head']:,}, KV cache {b['kv_cache']:,})")


def cmd_quantize(args):
    from gpt_fpga.quantize.quantizer import quantize_checkpoint
    from gpt_fpga.contract.layout import HwLayout

    if args.calib_tokens is not None and args.calib_tokens < 16:
        raise InputError(f"--calib-tokens must be >= 16, got {args.calib_tokens}")
    if args.weights == "int8" and args.group is not None:
        raise InputError("--group applies only to --weights int4 (int8 weights have one scale per row)")
    group = args.group or HwLayout.group
    out = output_file(args.out, "-o")
    if out.exists() and not out.is_file():  # the image is renamed over it: a device or pipe would be replaced
        raise InputError(f"-o {out}: is not a regular file; give the image file to write")
    check_writable(out, "-o")
    header = quantize_checkpoint(args.model, out, args.weights, group, args.bus_bits, args.calib,
                                 args.calib_tokens, rounding=args.rounding)
    size = out.stat().st_size
    print(f"wrote {out}: {size / 1e6:.2f} MB, {args.weights}"
          f"{' group ' + str(group) if args.weights == 'int4' else ''}, {args.bus_bits}-bit beats, "
          f"{header['rounding']['method']} rounding, "
          f"calibrated on {header['calibration']['tokens']} tokens ({header['calibration']['source']})",
          file=sys.stderr)


def cmd_compare(args):
    from gpt_fpga.host.compare import compare, compare_rtl

    if args.tokens < 2:
        raise InputError(f"--tokens must be >= 2, got {args.tokens}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; give a directory")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise InputError(f"--out {out}: cannot write there ({existing} is not a writable directory)")
    if getattr(args, "overlay", None) is not None and args.backend != "pynq":
        raise InputError(f"--overlay applies to --backend pynq only (not {args.backend})")
    if args.backend in ("rtl", "pynq"):
        if args.image is not None:
            raise InputError(f"compare --backend {args.backend} takes one weight image (the device is compared with "
                             f"the fixed model on it), not a model and an image")
        summary = compare_rtl(args.model, Path(args.text), out, args.tokens, backend=args.backend,
                              overlay=args.overlay)
        print(summary["verdict"])
        if not summary["identical"]:
            raise SystemExit(1)
        return
    if args.image is None:
        raise InputError("compare needs MODEL IMAGE (float against fixed), or IMAGE --backend rtl|pynq")
    summary = compare(args.model, args.image, Path(args.text), out, args.tokens)
    print(f"wrote {args.out}/compare.json and {args.out}/compare.png; logits SNR "
          f"{summary['logits']['snr_db']:.1f} dB, top-1 agreement {summary['top1_agreement']:.3f} "
          f"over {summary['tokens']} tokens")


def cmd_board_check(args):
    from gpt_fpga.host.board_check import board_check

    if not board_check(args.overlay, args.image):
        raise SystemExit(1)


def cmd_serve(args):
    from gpt_fpga.host.serve import serve

    if args.queue < 0:
        raise InputError(f"--queue must be >= 0, got {args.queue}")
    if args.max_body < 1024:
        raise InputError(f"--max-body must be >= 1024 bytes, got {args.max_body}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key is empty")
    serve(args.model, args.backend, args.overlay, args.host, args.port, args.api_key, args.queue, args.max_body)


def build_parser() -> argparse.ArgumentParser:
    from gpt_fpga.host.backends import BACKENDS
    from gpt_fpga.contract.layout import BUS_BITS_CHOICES, DEFAULT_GROUP, GROUP_CHOICES, WEIGHT_FORMATS
    from gpt_fpga.contract.image import ROUNDING_METHODS
    from gpt_fpga.host.serve_api import DEFAULT_MAX_BODY, DEFAULT_QUEUE

    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("gpt-fpga")
    except PackageNotFoundError:
        ver = "unknown"
    p = argparse.ArgumentParser(prog="gpt-fpga", description="GPT-2 / GPT-Neo on a Zynq FPGA: golden models, "
                                "quantizer and host driver.")
    p.add_argument("--version", action="version", version=f"gpt-fpga {ver}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_backend(sp):
        sp.add_argument("model", help="Hugging Face model directory (float) or weight image (fixed, rtl, pynq)")
        sp.add_argument("--backend", default="float", choices=list(BACKENDS),
                        help="float: float32 golden model; fixed: bit-exact integer model of the accelerator; "
                             "rtl: the engine's RTL in Verilator, through the board's driver; "
                             "pynq: the engine on the board (PYNQ) (default %(default)s)")
        sp.add_argument("--overlay", help="--backend pynq: the overlay's .bit, its .hwh beside it (default "
                        "$GPT_FPGA_OVERLAY, else build/overlay/gpt_fpga.bit)")

    g = sub.add_parser("generate", help="generate text, streamed as it is decoded")
    with_backend(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text, UTF-8 (needs a tokenizer)")
    src.add_argument("--ids", help="prompt as comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, help="sample with this temperature (0 means greedy; default: "
                   "greedy, or 1 with --top-k or --top-p)")
    g.add_argument("--top-k", type=int, help="sample from the K most likely tokens, K at most the vocabulary "
                   "(default: all)")
    g.add_argument("--top-p", type=float, help="sample from the smallest set with probability >= P (default: 1, all)")
    g.add_argument("--seed", type=int, help="random seed for sampling, >= 0 (default: a fresh seed each run); "
                   "greedy decoding ignores it")
    g.set_defaults(func=cmd_generate)

    lg = sub.add_parser("logits", help="save float32 logits [n_ids, vocab] for every position")
    with_backend(lg)
    lg.add_argument("--ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    lg.add_argument("--out", required=True, help="output .npy file")
    lg.add_argument("--int32", action="store_true",
                    help="write the contract's int32 logits (fixed, rtl, pynq backends) instead of float32")
    lg.set_defaults(func=cmd_logits)

    pp = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    with_backend(pp)
    pp.add_argument("--text", required=True, help="UTF-8 text file to score")
    pp.add_argument("--ctx", type=int, help="window length (default: the model's context)")
    pp.add_argument("--stride", type=int, help="window step (default: ctx/2)")
    pp.add_argument("--json", action="store_true", help="print one JSON object (and no progress bar)")
    pp.set_defaults(func=cmd_perplexity)

    qz = sub.add_parser("quantize", help="calibrate and quantize a checkpoint into a weight image")
    qz.add_argument("model", help="Hugging Face model directory")
    qz.add_argument("-o", "--out", required=True, help="output image file")
    qz.add_argument("--weights", default="int8", choices=list(WEIGHT_FORMATS),
                    help="weight format (default %(default)s)")
    qz.add_argument("--group", type=int, choices=list(GROUP_CHOICES), help=f"int4 group size (default {DEFAULT_GROUP})")
    qz.add_argument("--bus-bits", type=int, default=128, choices=list(BUS_BITS_CHOICES),
                    help="the engine's datapath width it is tiled for: 128 for the default two-port overlay, "
                         "64 for the one-port overlay (make bitstream PORTS=1) (default %(default)s)")
    qz.add_argument("--rounding", choices=list(ROUNDING_METHODS),
                    help="nearest: each weight to its nearest level; gptq: error-compensating, each rounding "
                         "error carried onto the weights not yet rounded (default: gptq for int4, nearest for int8)")
    qz.add_argument("--calib", help="calibration text file, UTF-8 (default: text sampled from the model itself)")
    qz.add_argument("--calib-tokens", type=int, help="tokens of calibration (default 2048 from --calib, "
                    "512 self-generated)")
    qz.set_defaults(func=cmd_quantize)

    cp = sub.add_parser("compare", help="per-layer accuracy of fixed against float, or equality of rtl and fixed")
    cp.add_argument("model", help="Hugging Face model directory (or, with --backend rtl, the weight image)")
    cp.add_argument("image", nargs="?", help="weight image made from the model")
    cp.add_argument("--backend", default="fixed", choices=["fixed", "rtl", "pynq"],
                    help="fixed: fixed against float, per layer and operation (default); rtl or pynq: the engine "
                         "(RTL simulation, or the board) against fixed, per layer, naming the first difference")
    cp.add_argument("--overlay", help="--backend pynq: the overlay's .bit, its .hwh beside it (default "
                    "$GPT_FPGA_OVERLAY, else build/overlay/gpt_fpga.bit)")
    cp.add_argument("--text", required=True, help="UTF-8 text file to run both models on")
    cp.add_argument("--out", required=True, help="output directory for compare.json (and compare.png for fixed)")
    cp.add_argument("--tokens", type=int, default=256, help="tokens of --text to use (default 256; at most the "
                    "model's context)")
    cp.set_defaults(func=cmd_compare)

    inf = sub.add_parser("info", help="model shape, parameters and DDR bytes per decoded token")
    inf.add_argument("model", help="Hugging Face model directory or weight image")
    inf.add_argument("--json", action="store_true", help="print one JSON object")
    inf.set_defaults(func=cmd_info)

    sv = sub.add_parser("serve", help="serve the model over HTTP: OpenAI-compatible /v1/completions and a page at / "
                        "(docs/serve.md)")
    sv.add_argument("model", help="weight image (made by 'gpt-fpga quantize')")
    sv.add_argument("--backend", default="fixed", choices=["fixed", "rtl", "pynq"],
                    help="fixed: the bit-exact integer model; rtl: the engine's RTL in Verilator; pynq: the engine "
                         "on the board (default %(default)s)")
    sv.add_argument("--overlay", help="--backend pynq: the overlay's .bit, its .hwh beside it (default "
                    "$GPT_FPGA_OVERLAY, else build/overlay/gpt_fpga.bit)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine "
                    "only; 0.0.0.0 exposes it to the network: set --api-key then)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health and the "
                    "page (default: $GPT_FPGA_API_KEY, else none)", default=os.environ.get("GPT_FPGA_API_KEY"))
    sv.add_argument("--queue", type=int, default=DEFAULT_QUEUE, help="requests that may wait behind the running "
                    "one; more get 503 with Retry-After (default %(default)s)")
    sv.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="largest request body in bytes "
                    "(default %(default)s)")
    sv.set_defaults(func=cmd_serve)

    bc = sub.add_parser("board-check", help="on the board: identity, DMA, bandwidth, interrupt and a LAYER "
                        "against the fixed model, as a table")
    bc.add_argument("--overlay", help="the overlay's .bit, its .hwh beside it (default $GPT_FPGA_OVERLAY, else "
                    "build/overlay/gpt_fpga.bit)")
    bc.add_argument("--image", help="weight image to run (default: a small random model built for the engine)")
    bc.set_defaults(func=cmd_board_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()
    except GptFpgaError as e:
        print(f"gpt-fpga: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an unreadable input: name the file, no traceback
        # files are written under contract.errors.writing, which names them; an unnamed write error
        # is standard output's (a closed pipe, a full disk)
        where = e.filename or "standard output"
        if e.filename is None:
            try:  # nothing more to flush at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):  # stdout is not a file (captured)
                pass
        if isinstance(e, BrokenPipeError):
            return 0
        print(f"gpt-fpga: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
