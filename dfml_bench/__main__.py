import sys

from dfml_bench.cli import main

sys.exit(main())
