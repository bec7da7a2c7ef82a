# The two commands of the README. Both install what they need (Debian
# packages, the guest kernel, the nested test host's kernel) and reuse caches.

.PHONY: demo test bench fuzz deaths soak ci-example
demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

# Not part of the tests: figures, never a pass or fail (docs/benchmarks.md).
RUNS ?= 20
bench:
	bash scripts/bench.sh $(RUNS)

# Every fuzz target for SECONDS each, or RUNS inputs if that comes first
# (0: no limit); docs/security.md has the figures.
SECONDS ?= 60
RUNS_FUZZ ?= 0
fuzz:
	bash scripts/fuzz.sh $(SECONDS) $(RUNS_FUZZ)

# Guest deaths at boot, capsid-vmm against QEMU microvm in the same test
# host: BOOTS per VMM for each K in AT_ONCE (docs/reliability.md).
BOOTS ?= 100
AT_ONCE ?= 1 2 4
deaths:
	bash scripts/deaths.sh $(BOOTS) "$(AT_ONCE)"

# Start-stop cycles with leak checks (docs/reliability.md): SOAK_RUNS of
# `capsid run -- true`, SOAK_CTR_RUNS of `ctr run --rm`.
SOAK_RUNS ?= 1000
SOAK_CTR_RUNS ?= 200
soak:
	bash scripts/soak.sh $(SOAK_RUNS) $(SOAK_CTR_RUNS)

# The worked example of docs/ci.md: a small project's build and test as an
# untrusted CI job, its artefacts and report out.
ci-example:
	bash scripts/ci-example.sh
