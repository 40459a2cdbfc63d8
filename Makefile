# Two entry points: `make demo` and `make test`. Both build .venv on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,eval,serve]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/streamedit stylize src/streamedit/assets/example.mp4 -o out/demo.mp4 \
		--prompt "oil painting" --model demo --size 256 --batch 4 --fixed-noise --lllite demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) out .pytest_cache
