# attnlab — the two front-door commands are `make run` (the whole study) and `make test` (the test suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned and installed first. PyPI serves each platform its own build of this version: CUDA on Linux
# x86-64, MPS on macOS. Override for another build, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
# The quick profile: a few MB of corpus, a tiny model, a short budget — the whole pipeline in minutes on a CPU.
QUICK_PARAMS ?= -S corpus.max_mb=3 -S tokenizer.vocab_size=2048 -S tokenizer.sample_mb=2 \
	-S model.d_model=128 -S model.n_layers=2 -S model.n_heads=4 -S model.d_ff=256 -S model.seq_len=128 \
	-S train.max_tokens=2000000 -S train.batch_size=16 -S train.lr=0.003 -S train.eval_tokens=16384 \
	-S eval.max_tokens=65536 -S eval.sample_tokens=80 \
	-S attention.n_examples=16 -S 'attention.seq_len_filter=[32,64]' \
	-S interventions.n_eval_tokens=16384 -S interventions.mean_tokens=16384 -S interventions.sample_tokens=60 \
	-S probe.n_examples=16 -S head_roles.n_sequences=32
# The study's own shape on a CPU: 4 layers x 4 heads over 512 tokens with the default corpus and 8,192-piece
# tokenizer (the data stages are the default study's), d_model 128 and a budget that fits 2 cores (docs/training.md,
# "The study's shape on a CPU"); every analysis at its params.yaml sizes.
STUDY_CPU_PARAMS ?= -S model.d_model=128 -S model.d_ff=512 -S train.batch_size=16 -S train.lr=0.003 \
	-S train.max_tokens=12000000
export PATH := $(abspath $(BIN)):$(PATH)

# The project's optional extras to install (pyproject.toml): dev = the test tools; lens = TransformerLens, for
# `make lens` and its tests (CI installs both: .ci/run). The venv is reinstalled when EXTRAS changes.
EXTRAS ?= dev

.PHONY: venv run quick test test-fast lens bench bench-compile gpu-check precision-seeds compare sweep results clean-venv FORCE

# Holds the EXTRAS of the last install; rewritten (which makes .installed out of date) only when they change.
$(BIN)/.extras: FORCE
	@mkdir -p $(BIN)
	@[ "$$(cat $@ 2>/dev/null)" = "$(EXTRAS)" ] || echo "$(EXTRAS)" > $@
FORCE:

# The installed torch is passed as a constraint to the project's install, so that no dependency (an extra's
# included) can replace it with another build.
$(BIN)/.installed: pyproject.toml $(BIN)/.extras
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > $(BIN)/.torch-constraint
	$(BIN)/python -m pip install -q -c $(BIN)/.torch-constraint -e ".[$(EXTRAS)]"
	touch $@

venv: $(BIN)/.installed

run: venv  ## the whole study with params.yaml
	dvc repro

quick: venv  ## the whole pipeline with the small CPU profile, applied as a DVC experiment
	dvc exp run $(QUICK_PARAMS)

study-cpu: venv  ## the whole pipeline at the study's shape (4 layers x 4 heads x 512 tokens) on a CPU, as a DVC experiment
	dvc exp run $(STUDY_CPU_PARAMS)

# The reference GPT trained alone at study-cpu's shape, budget and batches, in the precision the model trained in,
# against its models/model.pt: `make study-cpu` first.
reference-study-cpu: venv  ## the reference GPT against `make study-cpu`'s model, same shape, budget, tokens -> reports/reference_study_cpu.json
	$(BIN)/python -m benchmarks.bench_quality --out reports/reference_study_cpu.json

test: venv  ## the test suite
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test-fast: venv  ## the unit tests alone (no e2e: no stage subprocess, no dvc, no training run), for a quick loop
	$(BIN)/python -m pytest -n 2 -m "not e2e"

# `make lens`: models/model.pt as a TransformerLens model file (+ the tokenizer) for notebooks: README, "TransformerLens".
lens: EXTRAS = dev,lens
lens: venv  ## models/model.pt -> models/model_lens.pt, opens in TransformerLens (installs the lens extra)
	$(BIN)/python -m attnlab.export models/model.pt --tokenizer data/tokenizer --out models/model_lens.pt

bench: venv  ## throughput figures + quality against a reference GPT at the quick shape -> reports/bench.json
	$(BIN)/python -m benchmarks.bench --out reports/bench.json $(subst -S ,--set ,$(QUICK_PARAMS))

bench-compile: venv  ## torch.compile against eager, quick and study shape, compile time included -> reports/bench_compile.json
	$(BIN)/python -m benchmarks.bench --only compile --out reports/bench_compile.json $(subst -S ,--set ,$(QUICK_PARAMS))

# fp32 against bf16 autocast on the quick profile x compare.seeds: `make sweep` over train.precision, whole runs
# as DVC experiments (the table behind `train.precision: auto` in docs/performance.md). Where bf16 is emulated
# (CPUs without avx512_bf16/amx_bf16) a bf16 run takes ~15x as long as fp32.
precision-seeds: venv  ## fp32 vs bf16 autocast, quick profile x compare.seeds, as DVC experiments -> reports/sweep.html
	$(MAKE) sweep QUICK=1 SWEEP="-S train.precision=fp32,bf16"

# On a machine without CUDA it refuses at once (exit status 2, one line saying CUDA is needed). DRY_RUN=1: the same
# section on the CPU at GPU_CHECK_DRY_RUN's tiny shape, on data/tokens (synthetic tokens where there are none).
GPU_CHECK_DRY_RUN = --device cpu --check-steps 24 --check-warmup 8 \
	--set model.d_model=32 --set model.n_layers=2 --set model.n_heads=2 \
	--set model.d_ff=64 --set model.seq_len=32 --set train.batch_size=4 --set train.eval_tokens=256 \
	--set train.log_every=4 --set attention.n_examples=4 --set attention.batch_size=4 --set 'attention.seq_len_filter=[8,16]'
gpu-check: venv  ## one CUDA GPU: a few hundred bf16 + compile steps of the default shape, attention analysis -> reports/gpu_check.json (DRY_RUN=1: CPU, tiny shape)
	$(BIN)/python -m benchmarks.bench --only gpu_check --out reports/gpu_check.json $(if $(filter-out 0,$(DRY_RUN)),$(GPU_CHECK_DRY_RUN))

# `make compare` and `make sweep` queue grids with DVC's own syntax (a comma list in -S is one experiment per
# value; DVC takes the cartesian product), on top of the workspace params (+ the quick profile with QUICK=1),
# run the queue, then render. The renderer gets the same specs (--grid, without -S) and shows exactly the
# experiments of HEAD those grids produce; see docs/compare.md.
PROFILE = $(if $(QUICK),$(QUICK_PARAMS))
# seed=1,2,...,compare.seeds (params.yaml)
COMPARE_SEEDS ?= $(shell $(BIN)/python -c 'from attnlab.core.params import load_params as p; print(",".join(str(s + 1) for s in range(p().compare.seeds)))')
COMPARE_PE ?= model.pe=rope,rope_model_dim,sinusoidal,learned,none,complex,alibi
COMPARE_QKV ?= model.qkv_nonlinear_heads=[all]
# Experiments run side by side by `make compare` (each trains its own model; 1 suits a CPU or a single GPU).
JOBS ?= 1
COMPARE_THREADS ?= $(shell n=$$(( $$(nproc 2>/dev/null || sysctl -n hw.ncpu) / $(JOBS) )); echo $$(( n > 0 ? n : 1 )))
compare: venv  ## every PE variant + non-linear Q/K/V, x compare.seeds, as DVC experiments -> reports/compare.html
	$(if $(COMPARE_SEEDS),,$(error compare.seeds: could not read it from params.yaml))
	dvc exp run --queue $(PROFILE) -S '$(COMPARE_PE)' -S seed=$(COMPARE_SEEDS)
	dvc exp run --queue $(PROFILE) -S '$(COMPARE_QKV)' -S seed=$(COMPARE_SEEDS)
	OMP_NUM_THREADS=$(COMPARE_THREADS) dvc exp run --run-all -j $(JOBS)
	$(BIN)/python -m attnlab.report.compare $(PROFILE) --grid '$(COMPARE_PE)' seed=$(COMPARE_SEEDS) \
		--grid '$(COMPARE_QKV)' seed=$(COMPARE_SEEDS) --out reports/compare.html --figure reports/figures/compare_val_loss.png

# `make results`: the experiments behind docs/results.md on the quick CPU profile — every variant of `make compare`
# x compare.seeds — then their tables. BF16=1 adds the default variant under bf16 autocast x compare.seeds, each
# a whole pipeline run, and results_tables pairs them with the fp32 seeds.
# Only where bf16 is native (a CUDA GPU, a CPU with AMX/avx512_bf16): emulated it runs ~15x slower than fp32.
RESULTS_BF16 = $(if $(filter-out 0,$(BF16)),train.precision=bf16)
RESULTS_JOBS ?= 2
results: venv  ## docs/results.md's runs: make compare QUICK=1 (+ BF16=1: bf16 seeds) -> reports/compare.html, reports/results_tables.md
	$(if $(RESULTS_BF16),dvc exp run --queue $(QUICK_PARAMS) -S '$(RESULTS_BF16)' -S seed=$(COMPARE_SEEDS))
	$(MAKE) compare QUICK=1 JOBS=$(RESULTS_JOBS)
	$(BIN)/python -m attnlab.report.compare.results_tables $(QUICK_PARAMS) --grid '$(COMPARE_PE)' seed=$(COMPARE_SEEDS) \
		--grid '$(COMPARE_QKV)' seed=$(COMPARE_SEEDS) $(if $(RESULTS_BF16),--grid '$(RESULTS_BF16)' seed=$(COMPARE_SEEDS)) \
		--out reports/results_tables.md

clean-venv:
	rm -rf $(VENV)

# `make sweep`: the SWEEP grid (dvc exp run -S specs, e.g. SWEEP="-S model.d_model=64,128 -S train.lr=0.001,0.003")
# x SWEEP_SEEDS, run by DVC's queue with SWEEP_JOBS workers, each in its own workspace. The workers share the
# CPU cores: each gets cores / SWEEP_JOBS threads (oversubscribed, they slow to a crawl).
SWEEP ?= -S model.d_model=64,128
SWEEP_SEEDS ?= $(COMPARE_SEEDS)
SWEEP_JOBS ?= 2
SWEEP_THREADS ?= $(shell n=$$(( $$(nproc 2>/dev/null || sysctl -n hw.ncpu) / $(SWEEP_JOBS) )); echo $$(( n > 0 ? n : 1 )))
sweep: venv  ## queue the SWEEP grid, run it with SWEEP_JOBS workers -> reports/sweep.html
	$(if $(SWEEP_SEEDS),,$(error compare.seeds: could not read it from params.yaml))
	dvc exp run --queue $(PROFILE) $(SWEEP) -S seed=$(SWEEP_SEEDS)
	OMP_NUM_THREADS=$(SWEEP_THREADS) dvc exp run --run-all -j $(SWEEP_JOBS)
	$(BIN)/python -m attnlab.report.compare $(PROFILE) --grid $(subst -S ,,$(SWEEP)) seed=$(SWEEP_SEEDS) \
		--out reports/sweep.html --figure reports/figures/sweep_val_loss.png
