# The two commands a new user needs:
#   make serve   install everything and start the gateway on 127.0.0.1:8000 (local model, no keys)
#   make test    install the test dependencies and run the whole suite
HOST ?= 127.0.0.1
PORT ?= 8000
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: serve test install install-test bench eval

install:
	scripts/install.sh

install-test:
	scripts/install.sh --test

serve: install
	.venv/bin/ponder serve --host $(HOST) --port $(PORT) $(if $(CONFIG),--config $(CONFIG),)

test: install-test
	.venv/bin/python -m pytest $(PYTEST_ARGS)

bench: install-test
	.venv/bin/python bench/run_all.py

# Replays every recorded-outcome suite and rewrites the results in docs/eval.md and docs/img/.
eval: install-test
	.venv/bin/python -m evals.cli --suite all --out out/eval --docs docs
