#!/usr/bin/env bash
# On the development machine: build the parts a lent GPU machine needs. It reaches no package index and
# only 64 MiB travel per `device` call, so onnxruntime-gpu (255 MB) goes in four parts, xz-compressed.
# Usage: bash docs/gpu-session/prepare.sh   (then see docs/gpu-session/README.md)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for d in .g1 .g2 .g3 .g4 .g5 .gs; do
  grep -qx "/$d/" .git/info/exclude || echo "/$d/" >>.git/info/exclude
  rm -rf "$d" && mkdir "$d"
done
work=$(mktemp -d)
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$work" "$@"
}
get onnxruntime-gpu==1.31.1
get sqlalchemy watchdog psycopg psycopg-binary pgserver==0.1.4 py-spy
(cd "$work" && mkdir ort pgs && unzip -q onnxruntime_gpu-*.whl -d ort && unzip -q pgserver-*.whl -d pgs \
  && tar -C ort -cf - . | xz -9 -T0 >ort.tar.xz && split -b 60000000 -d -a 1 ort.tar.xz ort.part-)
mv "$work"/ort.part-0 .g1/ && mv "$work"/ort.part-1 .g2/ && mv "$work"/ort.part-2 .g3/ && mv "$work"/ort.part-3 .g4/
cp worker/models/default.fp16.onnx worker/models/default.onnx .g4/
cp "$work"/sqlalchemy-*.whl "$work"/watchdog-*.whl "$work"/psycopg*.whl .g4/
tar -C "$work"/pgs/pgserver -cJf .g5/pg.tar.xz pginstall && cp -r "$work"/pgs/pgserver.libs .g5/
cp "$work"/py_spy-*.whl .g5/ && cp -r ../shared/data/clothing-dataset-small/validation .g5/
cp docs/gpu-session/setup.sh docs/gpu-session/sweep.py .gs/
cat >.gs/stash.sh <<'STASH'
mkdir -p /tmp/parts && for d in .g1 .g2 .g3 .g4 .g5; do [ -d $d ] && cp -r $d/. /tmp/parts/; done; du -sh /tmp/parts
STASH
du -sh .g1 .g2 .g3 .g4 .g5
rm -rf "$work"
