# Two commands from a fresh clone: `make demo` (main job) and `make test`.
# Both install what they need first (tools/install.sh is idempotent and quick when done).
PY := $(if $(PYTHON),$(PYTHON),.venv/bin/python)
# The demo: Faster R-CNN (R18-FPN, from scratch, CPU) with EQLv2 and image-level labels on the
# generated Synthetic-LT; the baseline is the same config with the sigmoid loss.
DEMO_CFG := configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2_demo.yaml
DEMO_BASELINE_CFG := configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_sigmoid_demo.yaml
DEMO_OUT := output/demo
DEMO_BASELINE_OUT := output/demo_baseline
# Both configs measured with `make demo-reference` (seeds DEMO_SEEDS: one seed moves AP by ~2),
# shipped with the code.
DEMO_REFERENCE := benchmarks/results/demo_reference.json
DEMO_REFERENCE_OUT := output/demo_reference
DEMO_SEEDS := 0 1 2
DEMO_ENV := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}

.PHONY: install demo demo-eval demo-baseline demo-table demo-reference test

install:
	bash tools/install.sh

# Train the EQLv2 Faster R-CNN on CPU, evaluate it (LVIS AP, per-category CSV and plots in
# $(DEMO_OUT)/inference/synthetic_lt_val/), then print its AP / APr / APc / APf beside the
# sigmoid baseline's measured reference.
demo: install
	$(DEMO_ENV) $(PY) train_net.py --config-file $(DEMO_CFG) OUTPUT_DIR $(DEMO_OUT)
	@$(MAKE) --no-print-directory demo-table

# Optional: train the sigmoid baseline here too (same config, SigmoidCE); the table then
# shows both runs of this machine.
demo-baseline: install
	$(DEMO_ENV) $(PY) train_net.py --config-file $(DEMO_BASELINE_CFG) OUTPUT_DIR $(DEMO_BASELINE_OUT)
	@$(MAKE) --no-print-directory demo-table

# The table alone, from the runs' final_metrics.json and the shipped reference.
demo-table:
	@echo
	@$(PY) tools/demo_table.py $(DEMO_OUT) $(DEMO_BASELINE_OUT) --skip-missing --reference $(DEMO_REFERENCE)

# Re-evaluate the demo's final weights with --eval-only.
demo-eval: install
	$(DEMO_ENV) $(PY) train_net.py --config-file $(DEMO_CFG) --eval-only \
	  MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth OUTPUT_DIR $(DEMO_OUT)/eval_only

# Re-measure the reference: both configs, seeds DEMO_SEEDS, one run after another (a
# finished run is kept), then $(DEMO_REFERENCE) from their final_metrics.json.
demo-reference: install
	@mkdir -p $(DEMO_REFERENCE_OUT); set -e; for seed in $(DEMO_SEEDS); do for cfg in $(DEMO_CFG) $(DEMO_BASELINE_CFG); do \
	  out=$(DEMO_REFERENCE_OUT)/$$(basename $$cfg .yaml)_seed$$seed; \
	  if [ -f $$out/final_metrics.json ]; then echo "kept $$out"; continue; fi; \
	  echo "training $$out"; \
	  $(DEMO_ENV) $(PY) train_net.py --config-file $$cfg SEED $$seed OUTPUT_DIR $$out > $$out.log 2>&1 \
	    || { echo "failed, see $$out.log"; exit 1; }; \
	done; done
	$(PY) tools/demo_table.py --write-reference $(DEMO_REFERENCE) --command "make demo-reference DEMO_SEEDS='$(DEMO_SEEDS)'" \
	  $(foreach seed,$(DEMO_SEEDS),$(foreach cfg,$(DEMO_CFG) $(DEMO_BASELINE_CFG),$(DEMO_REFERENCE_OUT)/$(basename $(notdir $(cfg)))_seed$(seed)))

# The suite on TEST_WORKERS processes (one per core; 0: in this process), each test one
# thread; a worker that is free takes tests left to another (the multi-process tests last
# longest).
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15 tests
