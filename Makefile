# `make demo` and `make test` work on a fresh machine: each creates .venv and installs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pytest-xdist: the concurrency tests mostly wait on each other, so two per core pays.
TEST_WORKERS ?= 4

.PHONY: demo test test-lowest test-frameworks test-alembic-suite test-alembic-suite-lowest \
	container-test bench lint dist test-wheel clean

# The test extra's mysqlclient builds from source: scripts/install_build_deps.sh installs
# what it needs from Debian when missing (libmysqlclient's headers, pkg-config).
$(VENV)/.installed: pyproject.toml scripts/install_build_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	bash scripts/install_build_deps.sh
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py --workers 8

test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The same suite against the lowest alembic and SQLAlchemy that pyproject.toml allows.
.venv-lowest/.installed: pyproject.toml constraints/lowest.txt scripts/install_build_deps.sh
	$(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install --quiet --upgrade pip
	bash scripts/install_build_deps.sh
	.venv-lowest/bin/python -m pip install --quiet -e '.[test]' -c constraints/lowest.txt
	touch $@

test-lowest: .venv-lowest/.installed
	.venv-lowest/bin/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# tests/frameworks/: MLflow, Optuna and Flask-Migrate started by 8 processes at once on one
# SQLite file, with the lock and without (pinned in constraints/frameworks.txt, in a
# virtualenv of their own). `make test` does not collect that folder (pyproject.toml's
# norecursedirs); naming it here does. Two workers: these tests keep both cores busy.
FRAMEWORK_TEST_WORKERS ?= 2
.venv-frameworks/.installed: pyproject.toml constraints/frameworks.txt scripts/install_build_deps.sh
	$(PYTHON) -m venv .venv-frameworks
	.venv-frameworks/bin/python -m pip install --quiet --upgrade pip
	bash scripts/install_build_deps.sh
	.venv-frameworks/bin/python -m pip install --quiet -e '.[test]' -r constraints/frameworks.txt
	touch $@

test-frameworks: .venv-frameworks/.installed
	.venv-frameworks/bin/python -m pytest -n $(FRAMEWORK_TEST_WORKERS) --dist loadgroup \
		tests/frameworks $(PYTEST_ARGS)

# Alembic's own test suite: its SQLite test files, from the sdist of the alembic in the
# venv (downloaded once into .cache/alembic-suite/), run stock and then with every env.py
# its test helpers write rewritten into the one-call form (scripts/alembic_suite.py,
# tests/alembic_suite/; `make test` does not collect them). Fails when a test passes stock
# but not through run_migrations(); tests failing both ways are listed only.
test-alembic-suite: $(VENV)/.installed
	$(PY) scripts/alembic_suite.py $(ALEMBIC_SUITE_ARGS)

# The same with the lowest alembic and SQLAlchemy (.venv-lowest). Its pytest 8+ no longer
# calls the nose-style setup()/teardown() that 7 of alembic 1.13.0's tests rely on: they
# fail both ways (listed, not failed; with pytest<8 all pass).
test-alembic-suite-lowest: .venv-lowest/.installed
	.venv-lowest/bin/python scripts/alembic_suite.py $(ALEMBIC_SUITE_ARGS)

# The benchmark (bench/): BENCH_ARGS=--quick for a ~2.5 minute run (full: ~7.5).
# Writes bench/results/bench.{md,png,json}; BENCH_ARGS=--publish also bench/latest.{md,png}.
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench $(BENCH_ARGS)

# The seed's third level: the Flask example in 3 containers x 4 gunicorn workers on one
# bind-mounted SQLite file. Needs root on Debian 12; installs podman and debootstrap from
# Debian's packages and builds the base image on first use (containers/).
container-test:
	bash containers/test.sh

# mypy tests/typing: the public API's types (tests/typing/api.py: wrong calls must fail).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests/typing

# The sdist and the wheel (built from that sdist) in dist/, as they would be uploaded,
# and `twine check --strict` on them (the metadata PyPI reads, the README's content type).
# A stale egg-info's SOURCES.txt would add files that pyproject.toml no longer ships.
dist: $(VENV)/.installed
	rm -rf dist build *.egg-info
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

# The wheel as a user installs it (scripts/wheel_smoke.py): `make dist`, then a new
# virtualenv in a temporary folder, `pip install dist/*.whl` (SQLAlchemy and Alembic from
# the package index), and from a folder outside the checkout, PYTHONPATH unset: the
# versions agree, --help, init, upgrade head, status, and the demo. About a minute.
test-wheel: dist
	$(PY) scripts/wheel_smoke.py dist/*.whl

clean:
	rm -rf $(VENV) .venv-lowest .venv-frameworks .cache/alembic-suite .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist
