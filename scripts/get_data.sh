#!/usr/bin/env bash
# Offline stand-ins for the experiments' data sets, fetched from the package registry (no root):
#   trans-de-en (German-English dictionary with phrases and example sentences, GPL-2+) -> data/trans-de-en/
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p data/trans-de-en
tmp=$(mktemp -d)
(cd "$tmp" && apt-get download trans-de-en >/dev/null)
dpkg -x "$tmp"/trans-de-en_*.deb data/trans-de-en
rm -rf "$tmp"
echo "data/trans-de-en/usr/share/trans/de-en"
