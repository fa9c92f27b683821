# gpt-fpga: every target installs what it needs into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DEMO_MODEL ?= models/gpt2-kjv
DEMO_PROMPT ?= And God said
export XDG_CACHE_HOME ?= $(CURDIR)/build/cache

.PHONY: help demo test sim verilog synth bench install install-dev iverilog chromium serve clean

help: ## list every target
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.runtime: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e .
	@touch $@

$(VENV)/.dev: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[hw,test]'
	@touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime ## create .venv and install the runtime
install-dev: $(VENV)/.dev ## create .venv with simulation, synthesis and test tools

demo: $(VENV)/.runtime ## generate text with the bundled demo model
	$(BIN)/gpt-fpga generate $(DEMO_MODEL) --prompt "$(DEMO_PROMPT)" --max-new-tokens 80 \
		--temperature 0.8 --top-k 40 --seed 7

iverilog: ## install Icarus Verilog (Debian package) if it is missing
	@command -v iverilog >/dev/null || { echo "installing iverilog (apt-get)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iverilog >/dev/null) || \
		{ echo "error: Icarus Verilog is needed: apt-get install iverilog (as root)"; exit 1; }; }

chromium: ## install Debian's Chromium and ChromeDriver (the page's browser test) if missing
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { echo "installing chromium (apt-get)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
		{ echo "error: Chromium is needed: apt-get install chromium chromium-driver (as root)"; exit 1; }; }

serve: $(VENV)/.runtime ## serve the demo model (fixed backend) on http://127.0.0.1:8000/ (docs/serve.md)
	@mkdir -p build/serve
	@test -f build/serve/demo.img || $(BIN)/gpt-fpga quantize $(DEMO_MODEL) -o build/serve/demo.img
	$(BIN)/gpt-fpga serve build/serve/demo.img --backend fixed

test: $(VENV)/.dev iverilog chromium ## run the whole test suite (includes make sim)
	$(BIN)/pytest -q

sim: $(VENV)/.dev iverilog ## cocotb: every core against the golden model, Icarus and Verilator
	$(BIN)/pytest -q -m sim

verilog: $(VENV)/.dev ## write the cores' Verilog to build/verilog and lint it with Verilator
	$(PY) -m gpt_fpga.hw.synth verilog

synth: $(VENV)/.dev ## yosys xc7 utilization + nextpnr-ecp5 Fmax per core and whole engine -> build/synth/*.json
	$(PY) -m gpt_fpga.hw.synth synth

.PHONY: bitstream
bitstream: $(VENV)/.dev ## PYNQ-Z2 overlay with Vivado -> build/overlay/gpt_fpga.{bit,hwh,json} (WEIGHTS= GROUP= PORTS= CLOCK_MHZ= STRATEGY=)
	@$(PY) -m gpt_fpga.hw.bitstream --weights $(or $(WEIGHTS),int8) --group $(or $(GROUP),128) \
		--ports $(or $(PORTS),2) --clock-mhz $(or $(CLOCK_MHZ),142.857) --strategy "$(or $(STRATEGY),auto)"

bench: $(VENV)/.dev ## benchmarks -> build/bench/*.json; README's measured tables <- bench/records/*.json
	$(PY) -m gpt_fpga.bench --out build/bench --readme

clean: ## remove build outputs (keeps .venv)
	rm -rf build .pytest_cache
