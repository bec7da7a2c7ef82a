# The two commands of the README. Both install what they need (Debian
# packages, the guest kernel, the nested test host's kernel) and reuse caches.

.PHONY: demo test
demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh
