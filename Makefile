# Front door. `make quantize` rebuilds every shipped bundle in models/; `make test` runs the suite.
# Both create their own virtual environment (.venv) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data
BUILD ?= build
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

# Each task adds its own quantize-<task> target to this list.
QUANTIZE_TARGETS := quantize-digits
QUANTIZE_TARGETS += quantize-meter
QUANTIZE_TARGETS += quantize-face
QUANTIZE_TARGETS += quantize-face-resnet

.PHONY: env quantize test bench clean deploy face-edge face-recipes face-pack $(QUANTIZE_TARGETS)

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[host,device,dev]'
	touch $@

quantize: env $(QUANTIZE_TARGETS)
	@echo "All bundles rebuilt in models/; see models/*/report.md"

# Two digit bundles: the compact edge CNN (most accurate, smallest) and the classic seed CNN.
quantize-digits: env
	$(PY) -m training digits --arch edge --data-dir $(DATA_DIR) --out $(BUILD)/digits --quiet
	$(PY) -m converter digits --data-dir $(DATA_DIR) --model $(BUILD)/digits/model.keras --out models/digits
	$(PY) -m training digits --arch seed --epochs 12 --data-dir $(DATA_DIR) --out $(BUILD)/digits-seed --quiet
	$(PY) -m converter digits --data-dir $(DATA_DIR) --model $(BUILD)/digits-seed/model.keras --out models/digits-seed

quantize-meter: env
	$(PY) -m training meter --data-dir $(DATA_DIR) --out $(BUILD)/meter --with-validation --members 2
	$(PY) -m converter meter --data-dir $(DATA_DIR) --model $(BUILD)/meter/model.keras --out models/meter-digits

# The compact face student (models/face): dlib's face ResNet cut to 0.93 M parameters at a 112 px aligned chip (the
# strongest channels of every convolution), then distilled from the full network on 24 augmented versions of every
# training image (~1 h on 2 cores: teacher labels ~17 min the first time, cached in build/face-slim/teacher; 4 epochs
# of ~9.5 min).
# No dlib needed to train; dlib (host extra `teacher`, compiles from source ~10-15 min once) only gives the report
# its column of dlib's own numbers on the same pairs.
$(VENV)/.teacher: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e '.[host,device,dev,teacher]'
	touch $@

quantize-face: env $(VENV)/.teacher
	$(PY) -m training face-slim --data-dir $(DATA_DIR) --out $(BUILD)/face-slim/model
	$(PY) -m converter face --data-dir $(DATA_DIR) --model $(BUILD)/face-slim/model/model.keras --out models/face

# Optional, not shipped since session 8: the MobileFaceNet-like student learnt from scratch (0.52 M parameters,
# 96x96 unaligned crop; 95.0% LFW as models/face until then), as it was made: width 64 from 9 teacher-labelled versions
# (dlib's embeddings cached in build/face/teacher, first run ~80 min on 2 cores for 13 versions; up to 30 epochs:
# 2.6 min on a lent H100 with Keras on JAX from `make face-pack`, hours on 2 CPU cores), then 2 epochs at a lower rate
# on 13 versions (51 min on 2 CPU cores). Bundle in build/face-edge/bundle.
face-edge: env $(VENV)/.teacher
	$(PY) -m training face --data-dir $(DATA_DIR) --out $(BUILD)/face/model
	$(PY) -m training face --data-dir $(DATA_DIR) --init $(BUILD)/face/model/model.keras --versions 13 --epochs 2 \
		--lr 5e-4 --out $(BUILD)/face/finetune
	$(PY) -m converter face --data-dir $(DATA_DIR) --model $(BUILD)/face/finetune/model.keras --out $(BUILD)/face-edge/bundle

# dlib's face ResNet rebuilt in Keras from its public-domain weights (no training; seconds) for dlib's aligned chips;
# the converter bundles dlib's 5-point landmark model for the device to align with, and gates it like the student.
# The door lock's default embedder.
quantize-face-resnet: env
	$(PY) -m training face-resnet --out $(BUILD)/face-resnet
	$(PY) -m converter face --data-dir $(DATA_DIR) --model $(BUILD)/face-resnet/model.keras --out models/face-resnet

# Everything a GPU machine needs to train the from-scratch student (face-edge; no LFW folder, no dlib there): build/face/pack.npz,
# 13 versions (stage 1 reads the first 9: `--pack build/face/pack.npz`, stage 2 adds `--versions 13 --init ...`).
face-pack: env $(VENV)/.teacher
	$(PY) -m training face-pack --versions 13 --data-dir $(DATA_DIR) --out $(BUILD)/face/pack.npz

# Optional: the recipe comparison table quoted in models/face/report.md, with the settings it was made with
# (1,000 training people, originals only, 64x64, 8 epochs of 16x4 batches: ~2.5 min per recipe on 2 cores).
RECIPE_RUN = $(PY) -m training face --data-dir $(DATA_DIR) --out $(BUILD)/face/recipes --epochs 8 --versions 1 \
	--input-size 64 --subset-people 1000 --p 16 --k 4
face-recipes: env $(VENV)/.teacher
	$(RECIPE_RUN) --width 48 --compare triplet,cosface,distill,distill+triplet,distill+cosface,distill+simmatch+triplet
	$(RECIPE_RUN) --arch seed --compare distill+triplet

test: env
	EDGE_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q tests

bench: env $(VENV)/.teacher
	$(PY) -m device bench --models models --out models/benchmarks
	$(PY) -m training.face.bench --data-dir $(DATA_DIR) --out models/face-bench
	$(PY) -m device.doorlock bench --source $(DATA_DIR)/faces/scenes --out models/doorlock-bench

# Door lock on a Raspberry Pi over ssh: make deploy PI=user@host (see README, "Door lock").
deploy:
	@test -n "$(PI)" || { echo "usage: make deploy PI=user@host"; exit 2; }
	device/doorlock/deploy.sh $(PI)

clean:
	rm -rf $(BUILD) .pytest_cache
