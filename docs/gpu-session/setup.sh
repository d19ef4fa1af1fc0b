# On the GPU machine, sourced by each measuring command: installs what the parts brought (once), starts
# PostgreSQL as an unprivileged user (once), sets PYTHONPATH, PG (a URL) and the GPU configs in /tmp.
export PYTHONUNBUFFERED=1
R=$PWD
if [ ! -e /tmp/site/.done ]; then
  cat /tmp/parts/ort.part-* > /tmp/ort.tar.xz && mkdir -p /tmp/site && tar xJf /tmp/ort.tar.xz -C /tmp/site || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/parts/*.whl || exit 1
  mkdir -p /tmp/pg && tar xJf /tmp/parts/pg.tar.xz -C /tmp/pg && cp -r /tmp/parts/validation /tmp/validation
  touch /tmp/site/.done
fi
cp /tmp/parts/*.onnx worker/models/
export PYTHONPATH=/tmp/site:$R
[ -d /tmp/parts/pgserver.libs ] && cp -r /tmp/parts/pgserver.libs /tmp/pg/
export LD_LIBRARY_PATH=/tmp/pg/pgserver.libs
if ! /tmp/pg/pginstall/bin/pg_isready -h 127.0.0.1 -p 55432 >/dev/null 2>&1; then
  id pgrun >/dev/null 2>&1 || useradd -r -M pgrun || adduser --system --no-create-home pgrun
  mkdir -p /tmp/pgdata && chown pgrun /tmp/pgdata
  B=/tmp/pg/pginstall/bin
  runuser -u pgrun -- $B/initdb -D /tmp/pgdata/d -U fashion --auth=trust -E UTF8 --no-sync >/dev/null
  runuser -u pgrun -- $B/pg_ctl -D /tmp/pgdata/d -l /tmp/pgdata/log -o "-h 127.0.0.1 -p 55432 -k /tmp/pgdata -c fsync=off -c synchronous_commit=off -c max_connections=300 -c shared_buffers=1GB" -w start >/dev/null
  runuser -u pgrun -- $B/createdb -h 127.0.0.1 -p 55432 -U fashion fashion
fi
PG=postgresql+psycopg://fashion@127.0.0.1:55432/fashion
# The README's GPU config (JPEGs decoded by nvJPEG), and the same decoding on the CPU.
for decode in gpu cpu; do
  file=/tmp/gpu.toml && [ $decode = cpu ] && file=/tmp/gpucpu.toml
  printf '[batch]\nmax_batch = 64\ndecode_threads = 8\nmax_queue = 8192\ndecode_on = "%s"\n' $decode >$file
done
