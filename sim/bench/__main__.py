import sys

from gpt_fpga.sim.bench.suite import main

sys.exit(main())
