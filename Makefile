# byolfast: `make demo` (the main job on the embedded data, CPU) and `make test` (the test suite).
# Both install what they need first (apt packages FFCV builds against, a venv with exact pins); a second run skips it.
VENV ?= .venv
PY := $(VENV)/bin/python
BYOL := $(VENV)/bin/byol

.PHONY: setup demo demo-quick test bench profile clean

setup:
	@bash .ci/setup.sh

demo: setup
	$(BYOL) demo --out runs/demo

demo-quick: setup
	$(BYOL) demo --quick --out runs/demo-quick

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(BYOL) bench --what all --out benchmarks/results/cpu-latest.json

profile: setup
	$(BYOL) profile --config configs/demo_cpu.yaml --steps 12 --out runs/profile

clean:
	rm -rf runs data/demo data/bench
