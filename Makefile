# Every target uses the project's own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: install demo test nightly bench plans lint fixtures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# one rank per core, at most 4: more ranks than cores run slower than any plan predicts
DEMO_RANKS ?= $(shell n=$$(nproc 2>/dev/null || echo 4); [ $$n -lt 4 ] && echo $$n || echo 4)

## demo: compile the example GPT-2 for up to 4 CPU ranks (one per core) and run a few steps.
demo: $(STAMP)
	@mkdir -p out
	$(BIN)/alpa-plan compile tests/fixtures/gpt2.ts.onnx --dim batch=8 --dim seq=16 \
	  --cluster cpu:$(DEMO_RANKS) --loss cross_entropy --labels labels --optimizer adam \
	  -o out/demo-plan.json
	$(BIN)/alpa-plan inspect out/demo-plan.json
	$(BIN)/alpa-plan run out/demo-plan.json --model tests/fixtures/gpt2.ts.onnx --steps 5

## test: the CI suite (fast; slow suites are marked and run by `make nightly`).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

nightly: $(STAMP)
	$(BIN)/python -m pytest -q

## bench: planning-time, plan-quality and runtime benchmarks; writes bench/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python bench/run_all.py --out bench/RESULTS.md

## plans: regenerate the golden plans checked by tests/test_golden_plans.py.
plans: $(STAMP)
	$(BIN)/python plans/regenerate.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## fixtures: re-export the ONNX fixtures (needs torch + transformers; see tests/fixtures/export_models.py).
fixtures:
	$(PYTHON) tests/fixtures/export_models.py --out tests/fixtures

clean:
	rm -rf $(VENV) out .pytest_cache
