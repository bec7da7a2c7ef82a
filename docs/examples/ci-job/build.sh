#!/bin/sh
# A small CI job for docs/ci.md: "builds" a release of this project
# (renders a page per data file, packs them, checksums the pack) and
# tests it, the way a build and a test suite would. Runs in the busybox
# test image, in /work, with its artefacts in /work/dist.
set -eu
cd /work
rm -rf dist && mkdir -p dist/site
echo "== build"
for data in data/*.txt; do
    name=$(basename "$data" .txt)
    {
        echo "<h1>$name</h1>"
        sed 's/^/<p>/; s/$/<\/p>/' "$data"
    } > "dist/site/$name.html"
done
tar -C dist -czf dist/site.tar.gz site
(cd dist && sha256sum site.tar.gz > SHA256SUMS)
echo "== test"
[ "$(ls dist/site | wc -l)" = "$(ls data | wc -l)" ] || { echo "FAIL: a page is missing"; exit 1; }
(cd dist && sha256sum -c SHA256SUMS)
grep -q '<p>' dist/site/*.html || { echo "FAIL: empty pages"; exit 1; }
[ -r /run/secrets/deploy_token ] && echo "the deploy token is there ($(wc -c < /run/secrets/deploy_token) bytes)"
echo "== done: $(ls dist/site | wc -l) pages, $(wc -c < dist/site.tar.gz) bytes packed"
