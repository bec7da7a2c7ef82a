#!/usr/bin/env bash
# The worked example of docs/ci.md (`make ci-example`): a small project's
# build and test run as an untrusted CI job — source in over stdin, a
# secret, a scratch disk, limits, no network — and its artefacts and report
# out. Inside the nested test host where this host's KVM cannot boot Linux.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
. scripts/artifacts.sh
project=$PWD/docs/examples/ci-job
out=/tmp/capsid-ci-example
log "==> a CI job in a micro-VM: docs/examples/ci-job/build.sh"
run_with_kvm --with "$project" -- /bin/sh -c "
    set -e
    rm -rf $out && mkdir -p $out
    echo 'not-a-real-token' > $out/token
    tar -C $project -cf - . | $CAPSID_CLI run --rootfs $CAPSID_TEST_ROOTFS_DIR \
        --memory 256M --disk 256M --pids-limit 128 --timeout 5m \
        --secret deploy_token=@$out/token \
        --output /work/dist:$out/dist --report $out/report.json \
        -- sh -c 'mkdir -p /work && tar -xf - -C /work && /work/build.sh'
    echo '--- report.json'; cat $out/report.json
    echo '--- the artefacts on the host'; ls -lR $out/dist
"
