# `make bench`: the benchmark suite (bench/) against this machine's ceilings, measured in
# the same run; results in bench/results/latest.json and the table in docs/benchmarks.md.
# `make bench BENCH=ingest` (or several: BENCH="fanout campaign") runs only those.
.PHONY: bench bench-smoke

BENCH ?=

bench:
	./scripts/setup
	.venv/bin/python -m bench $(BENCH)

# The plumbing at tiny sizes (what tests/test_bench.py runs); touches no committed file.
bench-smoke:
	./scripts/setup
	.venv/bin/python -m bench $(BENCH) --smoke --out bench/results/smoke.json
