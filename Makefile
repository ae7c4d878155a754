# The three set-up commands, for people and for scripts.
PYTHON ?= python
# The CPU build of torch for laptops (PyPI's default torch wheel is the CUDA build, gigabytes); the
# GPU image pins its CUDA build (docker/Dockerfile).
TORCH ?= torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The offline demo: the same dvc.yaml with a few params changed (a DVC experiment).
# A tiny random-initialised SD 1.x model, a tiny captioner and CLIP, 12 generated images.
DEMO = \
	-S ++data.source=synthetic://12 \
	-S ++caption.model=tiny \
	-S ++model.id=tiny -S ++model.resolution=64 \
	-S ++train.steps=30 -S ++train.batch_size=2 -S ++train.lr=1.0e-3 -S ++train.lr_scheduler=constant \
	-S ++train.warmup_steps=0 -S ++train.snr_gamma=null -S ++train.checkpoint_every=10 -S ++train.log_every=5 \
	-S ++train.wandb=disabled -S ++train.validate_every=15 -S ++train.validation_steps=4 \
	-S '++train.validation_prompts=[a red circle on a gradient]' \
	-S '++quantize.variants=[int8wo]' -S '++quantize.lora_modes=[fused]' \
	-S ++evaluate.prompts=prompts/demo.txt -S ++evaluate.clip_model=tiny -S ++evaluate.steps=4 \
	-S '++evaluate.seeds=[0, 1]' -S ++evaluate.latency_repeats=2 \
	-S ++profile.steps=3 -S ++profile.warmup=2 \
	-S '++profile.inference=[{name: fp32}, {name: fp32-no-lora, lora: false}, {name: math-attention, attention: math}, {name: int8wo-fused, variant: int8wo-fused}]' \
	-S '++profile.matrix=[{name: baseline}, {name: checkpointing, gradient_checkpointing: true}, {name: math-attention, attention: math}, {name: channels-last, channels_last: true}, {name: rank4, lora: {rank: 4, alpha: 4.0}}, {name: on-the-fly, latents: on_the_fly}, {name: qlora, qlora: true}]'

.PHONY: install demo test lint

install:
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e '.[dev]'

demo:
	HF_HUB_OFFLINE=1 dvc exp run $(DEMO)
	@echo "demo: outputs in data/, cache/, models/, reports/ (params.yaml now holds the demo's values;"
	@echo "      'git checkout params.yaml && rm dvc.lock' returns to the real run)"

test:
	$(PYTHON) -m pytest -q

lint:
	bash .ci/lint.sh
