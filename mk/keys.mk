# API keys, managed once. On AWS with a key store (Terraform's key_store_url: always with more
# than one host, or create_key_store = true) they are one S3 object every host's gateway reads;
# these verbs change it with your own AWS credentials, and every gateway picks the change up
# within seconds. Without an AWS deployment in this checkout they change the local stack's
# keys file (`make local`), as `python -m app.keys --file` does.
#   make key-create NAME=analytics [MODELS=text2sql,embed] [RPM=120] [TPM=200000] [CONCURRENCY=8] [EXPIRES=2027-06-30]
#   make key-rotate NAME=analytics [GRACE=10]      (minutes the old key keeps working)
#   make key-revoke NAME=analytics
#   make key-list [ALL=1]
#   make key-import FILE=keys.json   (a host's own keys file into the store; nothing overwritten)
NAME ?=
MODELS ?=
RPM ?=
TPM ?=
CONCURRENCY ?=
EXPIRES ?=
GRACE ?=
ALL ?=
LOCAL_KEYS_FILE ?= .local/run/gateway/keys.json

# `python -m app.keys` reaching the keys: the deployment's store, else the local file; a
# deployment that keeps its keys on each host stops here with what to do instead
KEYS_CLI = where=$$($(AWS_OPS) key-store) || exit $$?; \
	[ -n "$$where" ] || where="--file $(LOCAL_KEYS_FILE)"; \
	$(PY) -m app.keys $$where

FILE ?=

.PHONY: key-name key-create key-rotate key-revoke key-list key-import

key-name:
	@test -n "$(NAME)" || { echo "error: name the key: NAME=<name> (letters, digits, . _ -)"; exit 2; }

key-create: venv key-name ## create an API key, printed once: NAME=... [MODELS=a,b] [RPM=] [TPM=] [CONCURRENCY=] [EXPIRES=]
	@$(KEYS_CLI) create '$(NAME)' $(if $(MODELS),--models '$(MODELS)') $(if $(RPM),--rpm $(RPM)) \
	  $(if $(TPM),--tpm $(TPM)) $(if $(CONCURRENCY),--concurrency $(CONCURRENCY)) \
	  $(if $(EXPIRES),--expires '$(EXPIRES)')

key-rotate: venv key-name ## replace a key, the new one printed once: NAME=... [GRACE=minutes]
	@$(KEYS_CLI) rotate '$(NAME)' $(if $(GRACE),--grace-minutes $(GRACE))

key-revoke: venv key-name ## stop a key from working on every host: NAME=...
	@$(KEYS_CLI) revoke '$(NAME)'

key-list: venv ## the keys (names, limits; never secrets): [ALL=1] includes revoked and expired
	@$(KEYS_CLI) list $(if $(ALL),--all)

key-import: venv ## add a keys file's keys to the deployment's store, overwriting none: FILE=keys.json
	@test -n "$(FILE)" || { echo "error: name the keys file: FILE=<path> (make ssh CMD='sudo cat /etc/llm-gateway/keys.json' > keys.json)"; exit 2; }
	@$(KEYS_CLI) import '$(FILE)'
