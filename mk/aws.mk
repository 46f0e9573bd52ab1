# AWS: terraform/ creates the GPU hosts, ansible/ configures them, stack/aws_ops.py operates
# them. docs/aws.md walks through it, from an empty account to a working HTTPS endpoint.
AWS_OPS := $(PY) -m stack.aws_ops
AWS_INVENTORY := ansible/inventories/aws/hosts.yml
# pinned in the dev extras of pyproject.toml, so it lives in the venv
ANSIBLE_PLAYBOOK ?= $(VENV)/bin/ansible-playbook
# the private key matching ssh_public_key, when it is not in ssh-agent or ~/.ssh defaults
SSH_KEY ?=
export SSH_KEY
# more ansible-playbook arguments for the site.yml run of `make deploy`, such as
# ANSIBLE_ARGS='-e @my-vars.yml' (extra vars win over group_vars) or '--limit llm-gpu-1'
ANSIBLE_ARGS ?=
HOST ?=
UNIT ?=
CMD ?=
CONFIRM ?=

# tools the infra tests need, kept out of $(VENV): checkov's pins would fight the app's
TOOLS_VENV := .local/tools-venv
CHECKOV_VERSION := 3.3.30
TERRAFORM_VERSION := 1.11.4
# SHA-256 of HashiCorp's release zips, from terraform_$(TERRAFORM_VERSION)_SHA256SUMS
TERRAFORM_SHA256_amd64 := 1ce994251c00281d6845f0f268637ba50c0005657eb3cf096b92f753b42ef4dc
TERRAFORM_SHA256_arm64 := a43d1d0da9b9bab214a8305a39db0e40869572594ccf50c416a7756499143633
TERRAFORM_MIN := 1.10
# a Terraform installed by deps-tools is found before any other
export PATH := $(CURDIR)/.local/bin:$(PATH)

.PHONY: plan deploy destroy inventory wait-ssh ssh logs status smoke-gpu stop start deps-tools \
        terraform-cli

# `make test` runs tests/infra/test_terraform.py: it needs Terraform and checkov
deps: deps-tools

plan: venv ## what `make deploy` would change in AWS (terraform plan)
	@$(AWS_OPS) terraform plan -input=false

deploy: venv ## AWS: terraform apply, inventory, SSH, Ansible, HTTPS smoke test (docs/aws.md)
	@test -f ansible/site.yml || { echo "error: ansible/site.yml is missing: the Ansible \
	playbook that configures the hosts is not in this checkout yet, nothing was created"; exit 2; }
	@echo ">> [1/6] preflight: tools, AWS credentials, GPU type in the region, vCPU quota"
	@$(AWS_OPS) preflight --ansible-playbook $(ANSIBLE_PLAYBOOK)
	@echo ">> [2/6] terraform apply"
	@$(AWS_OPS) terraform apply -input=false $(if $(filter yes,$(CONFIRM)),-auto-approve)
	@echo ">> [3/6] inventory from the terraform outputs"
	@$(AWS_OPS) inventory
	@echo ">> [4/6] waiting for SSH and cloud-init on every host"
	@$(AWS_OPS) wait-ssh
	@echo ">> [5/6] ansible-playbook site.yml (the first run installs the driver and loads models: 20-40 min)"
	@# the hosts.yml just written, not the aws_ec2 plugin beside it: the plugin's filters name
	@# one deployment and region, and could pick another deployment's hosts
	@ANSIBLE_CONFIG=ansible/ansible.cfg $(ANSIBLE_PLAYBOOK) -i $(AWS_INVENTORY) $(ANSIBLE_ARGS) ansible/site.yml
	@echo ">> [6/6] HTTPS smoke test: GET /ready (the certificate checked where it is trusted)"
	@$(AWS_OPS) smoke
	@$(AWS_OPS) summary

destroy: venv ## delete every AWS resource of the deployment (asks first; CONFIRM=yes does not)
	@if [ "$(CONFIRM)" != yes ]; then \
	  read -r -p "Destroy the AWS deployment: hosts, their volumes (model weights) and addresses? Type yes: " answer; \
	  [ "$$answer" = yes ] || { echo "nothing destroyed"; exit 1; }; fi
	@$(AWS_OPS) terraform destroy -input=false -auto-approve
	@rm -f $(AWS_INVENTORY) .local/aws_known_hosts .local/grafana-admin-password

inventory: venv ## write ansible/inventories/aws/hosts.yml (terraform outputs, else EC2 tags)
	@$(AWS_OPS) inventory

wait-ssh: venv
	@$(AWS_OPS) wait-ssh

ssh: venv ## SSH to a GPU host: make ssh [HOST=llm-gpu-1] [CMD='nvidia-smi']
	@$(AWS_OPS) ssh $(if $(HOST),--host $(HOST)) $(if $(CMD),-- '$(subst ','\'',$(CMD))')

logs: venv ## follow a unit's journal: make logs UNIT=gateway|nginx|vllm@<model> [HOST=...]
	@test -n "$(UNIT)" || { echo "error: name the unit: make logs UNIT=gateway (or nginx, vllm@text2sql ...)"; exit 2; }
	@$(AWS_OPS) logs '$(UNIT)' $(if $(HOST),--host $(HOST))

status: venv ## per GPU host: instance state, units, /ready
	@$(AWS_OPS) status

smoke-gpu: venv ## first real deploy: driver, DCGM, engines, one request per model on each host (export LLM_API_KEY first; [HOST=...])
	@$(AWS_OPS) smoke-gpu $(if $(HOST),--host $(HOST))

stop: venv ## stop the GPU instances: GPU billing stops, volumes and addresses stay
	@$(AWS_OPS) stop

start: venv ## start the stopped GPU instances; the services come up by themselves
	@$(AWS_OPS) start

deps-tools: $(TOOLS_VENV)/.checkov-$(CHECKOV_VERSION) terraform-cli ## checkov (pinned) and, when missing, Terraform

$(TOOLS_VENV)/.checkov-$(CHECKOV_VERSION):
	@echo ">> installing checkov $(CHECKOV_VERSION) into $(TOOLS_VENV)"
	@test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	@$(TOOLS_VENV)/bin/pip install -q checkov==$(CHECKOV_VERSION)
	@rm -f $(TOOLS_VENV)/.checkov-* && touch $@

# Terraform from HashiCorp's release zip, checked against its pinned SHA-256, into .local/bin;
# skipped when a Terraform >= $(TERRAFORM_MIN) is already on PATH
terraform-cli:
	@if command -v terraform >/dev/null && terraform version -json 2>/dev/null | $(PYTHON) -c \
	  'import json,sys; v=json.load(sys.stdin)["terraform_version"].split("."); sys.exit((int(v[0]),int(v[1])) < tuple(map(int,"$(TERRAFORM_MIN)".split("."))))'; \
	then exit 0; fi; \
	case "$$(uname -s)-$$(uname -m)" in \
	  Linux-x86_64) arch=amd64; sum=$(TERRAFORM_SHA256_amd64) ;; \
	  Linux-aarch64) arch=arm64; sum=$(TERRAFORM_SHA256_arm64) ;; \
	  *) echo "error: install Terraform $(TERRAFORM_MIN)+ yourself on this platform (https://developer.hashicorp.com/terraform/install)"; exit 2 ;; \
	esac; \
	echo ">> installing Terraform $(TERRAFORM_VERSION) into .local/bin"; \
	mkdir -p .local/bin && zip=$$(mktemp) && trap 'rm -f "$$zip"' EXIT && \
	curl -fsSL -o "$$zip" "https://releases.hashicorp.com/terraform/$(TERRAFORM_VERSION)/terraform_$(TERRAFORM_VERSION)_linux_$$arch.zip" && \
	echo "$$sum  $$zip" | sha256sum -c --quiet - && \
	$(PYTHON) -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("terraform", ".local/bin")' "$$zip" && \
	chmod +x .local/bin/terraform && .local/bin/terraform version
