# The pinned vLLM environments: one constraints file per platform (GPU hosts, CPU hosts and
# `make local`), generated from `vllm_version` in ansible/roles/vllm/defaults/main.yml.

.PHONY: vllm-lock vllm-lock-check

vllm-lock: venv ## re-resolve the vLLM constraints files (after changing vllm_version; minutes)
	$(PY) -m stack.vllm_lock

vllm-lock-check: venv ## check the vLLM constraints files against pip's resolution (minutes)
	$(PY) -m stack.vllm_lock --check
