"""gpt-fpga: GPT-2 / GPT-Neo decode on Zynq FPGAs.

The repository's top-level folders are this package's subpackages (``pyproject.toml`` maps
``gpt_fpga`` to the repository root), layered so that imports point one way only, as
``.importlinter`` enforces in ``make test``:

======================  =====================================================================
``gpt_fpga.bench``      benchmarks (``make bench``)
``gpt_fpga.host``       the ``gpt-fpga`` command line, backends (and the driver)
``gpt_fpga.sim.tb``     cocotb testbenches of the cores; ``gpt_fpga.quantize``: checkpoint -> image
``gpt_fpga.hw``         Amaranth gateware; ``gpt_fpga.sim.float_model`` / ``fixed_model``: golden models
``gpt_fpga.contract``   the contract: numerics, stream layout, image format, config, errors, registers
======================  =====================================================================
"""
