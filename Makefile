# Set-up commands for a fresh machine (see README):  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
# the torch the extension is built against (your pip index decides between its CPU and CUDA
# builds); override it, e.g.
#   make test TORCH="torch==2.9.0"
TORCH  ?= torch==2.13.0
# the linter's version is pinned, so that a new ruff release cannot fail CI on unchanged code
RUFF   ?= ruff==0.17.6
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.seed_fast-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: install demo test test-all test-floors lint info clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "setuptools>=77" wheel ninja

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	# torchao 0.18 (the quant tests) needs torch 2.11: with an older TORCH the suite runs without it
	$(PY) -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 11))" \
		|| $(PY) -m pip uninstall -q -y torchao
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/seed-fast demo

test: install
	$(PY) -m seed_fast.info
	$(PY) -m pytest -q -m "not slow" tests

# The declared floors (tests/floors.txt, the lowest versions pyproject.toml allows) in their own venv,
# seed_fast installed there from its sdist (not editable: the checkout's compiled extension belongs to
# .venv), and a smoke subset run outside the checkout's root so that the installed package is tested.
FLOORS_VENV ?= .venv-floors
FPY   := $(FLOORS_VENV)/bin/python
SMOKE := ops/test_codebook_lookup.py::test_expected_backends_are_present ops/test_codebook_lookup.py::test_odd_layouts \
	ops/test_codebook_lookup.py::test_vector_quantize_matches_plain_torch \
	ops/test_codebook_lookup.py::test_codebook_gradient_through_the_gather ops/test_codebook_lookup.py::test_opcheck \
	ops/test_codebook_lookup.py::test_torch_compile_fullgraph_and_export ops/test_codebook_lookup.py::test_bad_input \
	ops/test_lora_linear.py::test_errors ops/test_lora_linear.py::test_batched_leading_dims_and_base_weight_grad \
	ops/test_lora_linear.py::test_autocast_computes_in_the_autocast_dtype_and_grads_reach_fp32_weights \
	ops/test_lora_linear.py::test_multi_matches_reference ops/test_lora_linear.py::test_opcheck_and_compile \
	ops/test_qformer_attention.py::test_errors ops/test_qformer_attention.py::test_requested_backend_that_cannot_run_says_why \
	ops/test_qformer_attention.py::test_low_precision_error_is_bounded_by_torch ops/test_qformer_attention.py::test_causality \
	ops/test_qformer_attention.py::test_opcheck ops/test_qformer_attention.py::test_torch_compile_fullgraph \
	models/test_tokenizer.py models/test_checkpoint.py models/test_llm.py test_lora_peft.py models/test_unclip.py \
	models/test_image_decoder.py export/test_onnx_export.py train/test_streaming.py \
	--deselect tests/train/test_streaming.py::test_torchrun_two_ranks_stream_and_resume \
	--deselect tests/models/test_image_decoder.py::test_the_training_loss_goes_down \
	--deselect tests/models/test_image_decoder.py::test_latent_decoder_denoises_latents_and_draws_through_the_autoencoder \
	--deselect tests/models/test_image_decoder.py::test_attention_levels_puts_cross_attention_on_more_levels

test-floors:
	test -x $(FPY) || $(PYTHON) -m venv $(FLOORS_VENV)
	$(FPY) -m pip install -q --upgrade "setuptools>=77" wheel ninja
	$(FPY) -m pip install -q -r tests/floors.txt
	rm -rf $(FLOORS_VENV)/sdist
	$(FPY) setup.py -q egg_info --egg-base $(FLOORS_VENV) sdist --dist-dir $(FLOORS_VENV)/sdist
	SEED_FAST_BUILD_CUDA=0 $(FPY) -m pip install -q --no-build-isolation --no-deps --force-reinstall $(FLOORS_VENV)/sdist/seed_fast-*.tar.gz
	cd tests && ../$(FPY) -c "import seed_fast, sys; assert '$(FLOORS_VENV)' in seed_fast.__file__, seed_fast.__file__"
	cd tests && ../$(FPY) -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|diffusers|onnx|onnxruntime|safetensors|numpy|huggingface.hub) "
	cd tests && ../$(FPY) -m pytest -q -p no:cacheprovider -m "not slow" $(SMOKE)

lint: $(PY)
	$(PY) -m pip install -q "$(RUFF)"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-all: install
	$(PY) -m pytest -q tests

info: install
	$(PY) -m seed_fast.info

clean:
	rm -rf $(VENV) $(FLOORS_VENV) build *.egg-info seed_fast/*.so
