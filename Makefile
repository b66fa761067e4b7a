# `make demo`: set up (if needed) and run a real ATSC distillation on scikit-learn's digits.
# `make test`: set up (if needed) and run the test suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
# torch 2.14.1 / torchvision 0.29.1 are the builds that import together (and sit on this host's disk)
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install digits demo compare compare-adapt reproduce test test-quick docs clean wheels

install: $(VENV)/.installed

# constraints.txt: the exact versions CI ran (docs/getting-started.md, "The environment")
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# data/digits/{train,val}/ and _info.json; a no-op once written (and moves an older flat layout into split folders)
digits: install
	$(PY) -m shards.digits --out data/digits

runs/demo-teacher/student.safetensors: | digits
	$(LAUNCH) harness/run.py recipes/demo-teacher.yaml --resume

demo: digits runs/demo-teacher/student.safetensors
	$(LAUNCH) harness/run.py recipes/demo.yaml --resume
	$(PY) -m harness.plot runs/demo
	@echo "TensorBoard event files: runs/demo/tensorboard (watch: $(VENV)/bin/tensorboard --logdir runs/demo/tensorboard)"
	@echo "plot: runs/demo/plot.png (python -m harness.plot RUN [RUN ...] draws any run, or several side by side)"

# Every method on the digits at 32 px through CIFAR networks, 3 seeds each (recipes/compare/table.yaml):
# runs/compare/results.md, results.json and top1.png. Finished runs are reused; COMPARE_ARGS passes options.
compare: install digits
	$(PY) bench/compare.py recipes/compare/table.yaml $(COMPARE_ARGS)

# Where ATSC could help (recipes/compare/adapt.yaml): the student on 72 images of the train split, 5 seeds, ATSC
# as published, each remedy, the guard; runs/compare/results-adapt.md. Shares the teacher and finished runs with compare.
data/digits-72/_info.json: | install
	$(PY) -m shards.digits --out data/digits-72 --train-samples 72

compare-adapt: install digits data/digits-72/_info.json
	$(PY) bench/compare.py recipes/compare/adapt.yaml $(COMPARE_ARGS)

# The paper's CIFAR-100 table (recipes/cifar100/table.yaml): teachers once, then every method x pair x seed,
# one after another here, or as SLURM array jobs with REPRODUCE_ARGS="--slurm --sbatch=--gpus-per-task=1".
# CIFAR100 is the official python tarball, downloaded by you from https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR100 ?= cifar-100-python.tar.gz
data/cifar100/_info.json: | install
	@test -f "$(CIFAR100)" || { echo "make reproduce: no CIFAR-100 tarball at '$(CIFAR100)'; download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and run make reproduce CIFAR100=path/to/cifar-100-python.tar.gz" >&2; exit 2; }
	$(PY) -m shards.cifar --source "$(CIFAR100)" --out data/cifar100

# shards.layout: shards written before the per-split folders are moved into them (renames; a no-op after)
reproduce: install data/cifar100/_info.json
	$(PY) -m shards.layout data/cifar100 --quiet
	$(PY) bench/compare.py recipes/cifar100/table.yaml $(REPRODUCE_ARGS)

# the slowest 25 tests are listed at the end of every run: where the suite's time goes
test: install
	$(PY) -m pytest -q --durations=25 tests

# the unit tier, for iteration: every test that starts no training processes (tests/conftest.py marks the others)
test-quick: install
	$(PY) -m pytest -q --durations=10 -m "not launches" tests

# .whl/ (git-ignored): the wheels a bare GPU machine lacks (Python 3.12, x86-64) and the project's own, for
# `bench/gpu_suite.py OUT --wheels .whl` there (docs/performance.md, 'GPU figures: one command'). Needs pip's network.
wheels: install
	$(PY) bench/gpu_suite.py --make-wheels .whl

# Regenerate the recipe-key reference (docs/recipes.md) from the schema, then build the documentation
# site into site/ (git-ignored) strictly: a broken link or a page left out of mkdocs.yml's nav fails it. NO_MKDOCS_2_WARNING
# leaves out Material's notice about its successor.
docs: install
	$(PY) -m harness.recipe --write docs/recipes.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf runs data site
