# Pinning the declared models (stack/pin_models.py): each `revision` that is a branch or tag
# becomes the commit it names today. Resolving needs the hub and huggingface_hub, at the
# version the models role installs on the GPU hosts, in a small venv of its own.
HUB_VENV := .local/hub-venv
HUB_PACKAGES = $(shell grep -oE 'huggingface_hub==[0-9.]+' ansible/roles/models/defaults/main.yml | head -1) \
               $(shell grep -oE 'PyYAML==[0-9.]+' pyproject.toml | head -1)
# another declaration file, e.g. DECLARATION=docs/examples/text2sql-models.yml
DECLARATION ?=

.PHONY: pin-models pin-models-check

pin-models: $(HUB_VENV)/.installed ## write the commit of each declared revision that is a branch/tag (needs the hub; HF_TOKEN for gated; DECLARATION=<file>)
	$(HUB_VENV)/bin/python -m stack.pin_models $(DECLARATION)

pin-models-check: venv ## fail when a declared revision is not a commit yet (asks no hub; DECLARATION=<file>)
	$(PY) -m stack.pin_models --check $(DECLARATION)

$(HUB_VENV)/.installed: ansible/roles/models/defaults/main.yml pyproject.toml
	@echo ">> installing $(HUB_PACKAGES) into $(HUB_VENV)"
	@test -x $(HUB_VENV)/bin/python || $(PYTHON) -m venv $(HUB_VENV)
	@$(HUB_VENV)/bin/pip install -q $(HUB_PACKAGES)
	@touch $@
