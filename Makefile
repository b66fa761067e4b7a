# `make demo`: set up (if needed) and run a real ATSC distillation on scikit-learn's digits.
# `make test`: set up (if needed) and run the test suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
# torch 2.14.1 / torchvision 0.29.1 are the builds that import together (and sit on this host's disk)
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo compare test docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

data/digits/_info.json: | install
	$(PY) -m shards.digits --out data/digits

runs/demo-teacher/student.safetensors: | data/digits/_info.json
	$(LAUNCH) harness/run.py recipes/demo-teacher.yaml --resume

demo: runs/demo-teacher/student.safetensors
	$(LAUNCH) harness/run.py recipes/demo.yaml --resume

# Every method on the digits, 3 seeds each (24 min on 2 busy CPU cores; the teachers, once, 20 more):
# runs/compare/compare.md, compare.json and top1.png. Finished runs are reused; COMPARE_ARGS passes options.
compare: install data/digits/_info.json
	$(PY) bench/compare.py $(COMPARE_ARGS)

test: install
	$(PY) -m pytest -q tests

# Regenerate the README's recipe-key reference from the schema.
docs: install
	$(PY) -m harness.recipe --write README.md

clean:
	rm -rf runs data
