#!/usr/bin/env bash
# The board's Python, checked here: PYNQ 3.x images run Python 3.10, and pynq pins numpy<2.
#
# Makes a Python 3.10 venv from pyenv (build/board-py310, or $BOARD_VENV), installs the package as a board
# user does (pip install '.[board]': into a fresh venv, the newest pynq the extra allows, 4.0.0 today, and
# numpy 1.26; the extra also accepts the PYNQ-Z2 images' own pynq 3.0.1 / 3.1, which pip then keeps), then,
# with that Python:
#   1. the off-board tests of the PYNQ device against the real pynq (tests/test_pynq_device.py), its
#      interrupts through pynq's own Interrupt, axi_intc driver and interrupt mocks;
#   2. the golden model a board user checks against: quantize the bundled gpt2-kjv, generate with
#      --backend fixed, and (when the main venv exists) compare its int32 logits with the main venv's
#      (Python 3.11, numpy 2): the integer model must give the same integers on both;
#   3. gpt-fpga serve (Starlette, uvicorn) on that Python: a greedy completion over loopback is
#      generate's text.
# pyenv or its 3.10 missing: a failure under CI=true (the check must run there), else a skip.
# About 1.5 minutes with a cold pip cache, 30 s warm.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "board-python: $*" >&2; }
on_ci() { [[ "$(echo "${CI:-}" | tr '[:upper:]' '[:lower:]')" =~ ^(true|1|yes)$ ]]; }
missing() {
  if on_ci; then say "error: $1 (CI=true: the board's Python must be checked)"; exit 1; fi
  say "skipped: $1"; exit 0
}

PYENV=$(command -v pyenv || true)
for p in "${PYENV_ROOT:-}/bin/pyenv" "$HOME/.pyenv/bin/pyenv"; do [[ -n "$PYENV" || ! -x "$p" ]] || PYENV=$p; done
[[ -n "$PYENV" ]] || missing "pyenv is not installed (it provides Python 3.10, the PYNQ images' Python)"
PY310=$(ls -d "$("$PYENV" root)"/versions/3.10.*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
[[ -n "$PY310" && -x "$PY310" ]] || missing "pyenv has no Python 3.10 (pyenv install 3.10)"

start=$SECONDS
VENV=${BOARD_VENV:-build/board-py310}
OUT=$VENV/check
[[ -x $VENV/bin/python ]] || "$PY310" -m venv "$VENV"
PY=$VENV/bin/python
say "installing '.[board]' into $VENV ($("$PY" --version))"
# uninstall first: pip keeps an installed gpt-fpga of the same version instead of this checkout's
"$PY" -m pip uninstall -q -y gpt-fpga >/dev/null 2>&1 || true
"$PY" -m pip install -q --disable-pip-version-check '.[board]' 'pytest==9.2.0' 'pytest-timeout==2.4.0' >"$VENV/pip.log" 2>&1 || {
  tail -n 30 "$VENV/pip.log" >&2; say "error: pip install '.[board]' failed on Python 3.10 (log: $VENV/pip.log)"; exit 1; }
"$PY" - <<'EOF'
import sys, numpy, pynq, gpt_fpga
from importlib.metadata import version
assert sys.version_info[:2] == (3, 10), sys.version
assert numpy.__version__.startswith("1."), f"pynq needs numpy<2, got {numpy.__version__}"
assert "site-packages" in gpt_fpga.__file__, f"gpt_fpga from {gpt_fpga.__file__}, not the installed package"
print(f"board-python: Python {sys.version.split()[0]}, pynq {version('pynq')}, numpy {numpy.__version__}, "
      f"matplotlib {version('matplotlib')}, gpt-fpga {version('gpt-fpga')}", file=sys.stderr)
EOF

# pynq installs a top-level `tests` package: import the test file by path (importlib mode), no cache dir,
# and the installed gpt_fpga (the venv's pytest script does not put the checkout on sys.path).
say "tests/test_pynq_device.py with the real pynq"
"$VENV/bin/pytest" -q -p no:cacheprovider --import-mode=importlib --rootdir=. tests/test_pynq_device.py

say "golden model on Python 3.10: quantize models/gpt2-kjv, generate with --backend fixed"
mkdir -p "$OUT"
IMG=$OUT/gpt2-kjv-int8.img
"$VENV/bin/gpt-fpga" quantize models/gpt2-kjv -o "$IMG" --weights int8 2>"$OUT/quantize.log" || {
  cat "$OUT/quantize.log" >&2; exit 1; }
tail -n 1 "$OUT/quantize.log" >&2
"$VENV/bin/gpt-fpga" generate "$IMG" --backend fixed --prompt "And God said" --max-new-tokens 24 \
  | tee "$OUT/generate.txt"

say "gpt-fpga serve on Python 3.10: a greedy completion over loopback equals generate's text"
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$VENV/bin/gpt-fpga" serve "$IMG" --backend fixed --port "$PORT" >"$OUT/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null || true' EXIT
"$PY" - "$PORT" "$OUT/generate.txt" <<'EOF'
import json, sys, time, urllib.request
url, want = f"http://127.0.0.1:{sys.argv[1]}", open(sys.argv[2], encoding="utf-8").read()
for _ in range(300):
    try:
        urllib.request.urlopen(url + "/health", timeout=5).read()
        break
    except OSError:
        time.sleep(0.1)
body = json.dumps({"prompt": "And God said", "max_tokens": 24, "temperature": 0}).encode()
req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
got = json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["text"]
assert "And God said" + got + "\n" == want, (got, want)
page = urllib.request.urlopen(url + "/", timeout=10).read().decode()
assert "<textarea" in page, "the page (host/serve_page.html) is missing from the installed package"
print("board-python: gpt-fpga serve answers generate's text", file=sys.stderr)
EOF
kill "$SERVE_PID"
trap - EXIT
IDS=1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16
"$VENV/bin/gpt-fpga" logits "$IMG" --backend fixed --ids $IDS --int32 --out "$OUT/logits-py310.npy"
if [[ -x .venv/bin/gpt-fpga ]]; then
  .venv/bin/gpt-fpga logits "$IMG" --backend fixed --ids $IDS --int32 --out "$OUT/logits-main.npy"
  "$PY" - "$OUT" <<'EOF'
import sys, numpy as np
a, b = (np.load(f"{sys.argv[1]}/logits-{n}.npy") for n in ("py310", "main"))
assert a.dtype == b.dtype == np.int32 and a.shape == b.shape, (a.shape, b.shape)
assert np.array_equal(a, b), f"{int((a != b).sum())} int32 logits differ between Python 3.10 (numpy 1) and the main venv"
print(f"board-python: the fixed model's {a.size} int32 logits are equal on Python 3.10 (numpy 1) and the main venv",
      file=sys.stderr)
EOF
fi
say "done in $((SECONDS - start)) s"
