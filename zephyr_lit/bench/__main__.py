import sys

from zephyr_lit.bench.cli import main

sys.exit(main())
