"""The resattn_fast benchmark suite (run it with ``python benchmarks/run.py --help``)."""
