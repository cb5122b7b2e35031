# Quickstart targets: `make demo` and `make test` work on a fresh clone (they create .venv and install what is missing).
# `make test` also builds the docs (mkdocs build --strict, tests/test_docs.py); `make docs` builds them into site/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: install data demo test test-slow docs bench bench-full clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,deploy,docs]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package, where apt is available (tests that need it fail in CI without it).
data:
	@test -f $(FMNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
		echo "Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (the demo and the tests need it)"; }

# The demo: the trained cifar_resnet20 shipped with the package loses 42% of its FLOPs: three blocks and 3% of the channels (Fashion-MNIST).
demo: $(STAMP) data
	$(VENV)/bin/resconv demo

test: $(STAMP) data
	$(PY) -m pytest

test-slow: $(STAMP) data
	$(PY) -m pytest -m slow

# The docs site (docs/, mkdocs.yml) into site/; --strict: a broken link, anchor or API reference fails
docs: $(STAMP)
	$(PY) -m mkdocs build --strict -d site

BENCHMARKS := latency_equal_flops fusion_overhead accuracy plain_networks tool_speed ablation_depth deploy_latency \
	equal_latency runtime_budget pretrained_transfer

# Every benchmark in its --quick form (each under about 2 minutes on 2 cores; outputs in benchmarks/results/*_quick*,
# not committed)
bench: $(STAMP) data
	for b in $(BENCHMARKS); do $(PY) benchmarks/$$b.py --quick || exit 1; done

# The full runs whose results the docs quote (benchmarks/README.md), with their exact commands (about 9 hours of 2
# CPU cores; the accuracy benchmark keeps finished rows under runs/bench_cache, so an interrupted run resumes)
bench-full: $(STAMP) data
	$(PY) benchmarks/latency_equal_flops.py
	$(PY) benchmarks/fusion_overhead.py
	$(PY) benchmarks/accuracy.py --archs cifar_resnet20 --budgets 0.35 0.5 0.65 --name accuracy_cifar_resnet20
	$(PY) benchmarks/accuracy.py --archs cifar_resnet56 --train-subset 8000 --base-epochs 8 --no-finetune 0.1 0.2 \
		--name accuracy_cifar_resnet56
	$(PY) benchmarks/plain_networks.py --train-subset 10000
	$(PY) benchmarks/tool_speed.py
	$(PY) benchmarks/baselines/train.py --arch cifar_resnet20 --epochs 20 --threads 2
	$(PY) benchmarks/ablation_depth.py --threads 2
	$(PY) -m pip install --quiet -e '.[deploy-bench]'
	$(PY) benchmarks/deploy_latency.py --threads 1
	$(PY) benchmarks/runtime_budget.py --threads 1
	$(PY) benchmarks/baselines/train.py --arch cifar_resnet56 --threads 2
	$(PY) benchmarks/equal_latency.py --threads 2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache site
