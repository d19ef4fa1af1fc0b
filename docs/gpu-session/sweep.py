"""On the GPU machine: worker.bench.several_workers (what `bench --workers N` times) for a sweep of
worker counts and decode places, one JSON line each. Usage: python3 sweep.py IMAGES URL [N:gpu|cpu,...]
(env BURST, DT = decode threads, IOT = model.intra_op_threads)."""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from worker.bench import BenchOptions, image_files, several_workers
from worker.model import DEFAULT_MODEL_GPU

images, url = Path(sys.argv[1]), sys.argv[2]
plan = [(int(n), where) for n, where in (s.split(":") for s in (sys.argv[3] if len(sys.argv) > 3
        else "2:gpu,4:gpu,8:gpu,4:cpu,8:cpu,12:cpu").split(","))]
files = image_files(images)
out = Path(os.environ.get("OUT", "."))
for count, where in plan:
    options = BenchOptions(images=images, burst=int(os.environ.get("BURST", "6000")), workers=count, database=url,
                           max_batch=64, decode_threads=int(os.environ.get("DT", "8")), max_queue=8192,
                           decode_on=where, intra_op_threads=int(os.environ.get("IOT", "0")),
                           progress=lambda m: print("bench:", m, file=sys.stderr, flush=True))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        try:
            figures = several_workers(Path(tmp), files, DEFAULT_MODEL_GPU, options)
        except Exception as exc:  # keep the sweep going; say what broke
            print(json.dumps({"workers": count, "decode_on": where, "error": repr(exc)}), flush=True)
            for log in sorted(Path(tmp).glob("worker-*.log"))[:2]:
                print(log.name, log.read_text()[-1500:], flush=True)
            continue
    figures.update(decode_on=where, wall_s=round(time.time() - started, 1))
    print(json.dumps(figures), flush=True)
    with open(out / "sweep.jsonl", "a") as handle:
        handle.write(json.dumps(figures) + "\n")
