# make demo   — set up .venv (CPU torch pinned, matplotlib) and run the built-in CPU demo: outputs/demo/demo.{json,png}
# make test   — set up .venv with dev extras and run the whole suite, then the pre-5.23 transformers suite
.PHONY: demo test test-current test-legacy lint

demo:
	bash scripts/setup.sh
	.venv/bin/orthoreg demo --out outputs/demo
	@echo "demo results: outputs/demo/demo.json and outputs/demo/demo.png"

test: test-current test-legacy

test-current:
	bash scripts/setup.sh --dev
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider

# transformers < 5.23 runs decoder-layer hooks inside the activation checkpoint: the gradient tests run there too.
test-legacy:
	bash scripts/setup.sh --legacy .venv-legacy
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv-legacy/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_penalties.py tests/test_capture.py tests/test_callback_grads.py tests/test_callback.py \
		tests/test_lora.py tests/test_baselines.py tests/testbed \
		tests/test_exactness.py tests/test_robustness.py tests/test_reference_gradients.py tests/test_base_units.py \
		tests/test_reader_front_doors.py tests/test_front_door.py tests/test_reader_base_units.py \
		tests/test_front_door_anchor.py tests/test_anchor_kl.py

lint:
	.venv/bin/ruff check orthoreg tests scripts
