"""Speed and memory benchmarks, run from a checkout (see benchmarks/README.md);
not part of the installed package."""
