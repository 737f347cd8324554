# The README's two commands. Each sets up .venv/ first (scripts/bootstrap.sh: created once, installs redone only
# when pyproject.toml or the torch choice changed; TORCH_SPEC overrides that choice), then runs.
#   make run                                  the main job: a LoRA run on a random-init GPT-2, into runs/offline
#   make test                                 the whole test suite
#   make test PYTEST_ARGS="-x -k config"      some of it
RUN_CONFIG ?= configs/offline.yaml
# each `make run` replaces the last one's run directory (RUN_ARGS=--resume continues it instead)
RUN_ARGS ?= --overwrite
PYTEST_ARGS ?=

.PHONY: run test

run:
	@bash scripts/bootstrap.sh run train $(RUN_CONFIG) $(RUN_ARGS)

test:
	@bash scripts/bootstrap.sh test -q -p no:cacheprovider tests $(PYTEST_ARGS)
