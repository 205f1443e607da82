# Two commands from a fresh clone: `make demo` (main job) and `make test`.
# Both install what they need first (tools/install.sh is idempotent and quick when done).
PY := $(if $(PYTHON),$(PYTHON),.venv/bin/python)
DEMO_CFG := configs/Synthetic-LT/mask_rcnn_R18_FPN_d2heads_softmax.yaml
DEMO_OUT := output/demo

.PHONY: install demo demo-eval test

install:
	bash tools/install.sh

# Train a Mask R-CNN on the generated Synthetic-LT data on CPU, then evaluate it (LVIS AP).
demo: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) train_net.py --config-file $(DEMO_CFG) OUTPUT_DIR $(DEMO_OUT)

# Re-evaluate the demo's final weights with --eval-only.
demo-eval: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) train_net.py --config-file $(DEMO_CFG) --eval-only \
	  MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth OUTPUT_DIR $(DEMO_OUT)/eval_only

test: install
	$(PY) -m pytest -q tests
