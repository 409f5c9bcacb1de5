# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv and install everything first. Override e.g. `make demo EPOCHS=50`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch 2.13.0; pass TORCH_SPEC=torch (or a CUDA index) for a GPU build.
TORCH_SPEC ?= torch==2.13.0
# ONNX Runtime: the cpu extra (onnxruntime) or gpu (onnxruntime-gpu); never both in one venv.
ORT ?= cpu
ORT_OTHER := $(if $(filter gpu,$(ORT)),onnxruntime,onnxruntime-gpu)
EPOCHS ?= 10
RUN ?= runs/demo
# MNIST: $AAE_DATA_DIR when set (aae-train reads it), else the shared copy beside the project if
# present, else a download (the order of the README).
DATA_DIR ?= $(if $(AAE_DATA_DIR),,$(firstword $(wildcard ../shared/data/mnist)))
DATA_FLAG := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip uninstall -q -y $(ORT_OTHER) aae 2>/dev/null || true  # the other ONNX Runtime; aae: this project's old distribution name
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[train,$(ORT),serve,watch,dev]"
	@# ONNX Runtime for Node.js, for the test of a client without Python (its CPU binaries ship in the
	@# package: no install script runs); skipped where npm is missing
	-command -v npm >/dev/null && npm install -q --no-save --no-audit --no-fund --ignore-scripts --prefix $(VENV)/node "onnxruntime-node@1" >/dev/null
	touch $@

demo: setup
	@if [ -e $(RUN)/checkpoint.pt ]; then echo "error: $(RUN) already holds a run: make demo RUN=runs/demo2 trains another beside it (make clean removes .venv and runs/)" >&2; exit 2; fi
	$(BIN)/aae-train mnist $(DATA_FLAG) --epochs $(EPOCHS) --out $(RUN)
	$(BIN)/aae-export --checkpoint $(RUN)/checkpoint.pt --out $(RUN)/model
	$(BIN)/aae-train demo-images $(DATA_FLAG) --out $(RUN)/images
	$(BIN)/aae-run score $(RUN)/images --model $(RUN)/model --output $(RUN)/scores.csv; test $$? -le 1
	$(BIN)/aae-run sample --model $(RUN)/model -n 64 --seed 0 --out $(RUN)/samples-onnx.png

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
