"""`python -m benchmarks.serve_bench ...`: the same flags as `pagedserve bench serve`."""
import sys

from benchmarks.serve_bench.cli import main

sys.exit(main())
