# Two entry points: `make demo` and `make test`. Both build .venv on a fresh machine, with the exact
# versions in constraints.txt (`make lock` moves them forward; README "Dependencies").
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install lock clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv --clear $(VENV)  # a venv exactly as pinned: nothing left from older pins
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test,eval,serve,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/streamedit stylize src/streamedit/assets/example.mp4 -o out/demo.mp4 \
		--prompt "oil painting" --model demo --size 256 --batch 4 --fixed-noise --lllite demo

test: $(STAMP)
	$(PY) -m pytest

lock:
	HOLD="$(HOLD)" scripts/lock.sh

clean:
	rm -rf $(VENV) out .pytest_cache
