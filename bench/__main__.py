import sys

from gpt_fpga.bench.suite import main

sys.exit(main())
