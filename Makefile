# The two commands of the README. Both install what they need (Debian
# packages, the guest kernel, the nested test host's kernel) and reuse caches.

.PHONY: demo test bench-boot
demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

# Not part of the tests: figures, never a pass or fail.
BOOTS ?= 20
bench-boot:
	bash scripts/bench-boot.sh $(BOOTS)
