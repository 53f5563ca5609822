# Re-hash rate of engine.manifest.hash_file (what --verify-cache full runs per file), N threads, warm/cold page cache.
# Run from the repository root: OUT=/tmp python3 results/h200/bench_verify_h200.py 4000 (MB of model to write)
import json
import os
import statistics as st
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.getcwd())
from engine.manifest import hash_file

d = "/tmp/bv"
os.makedirs(d, exist_ok=True)
MB = 10**6
S = int(sys.argv[1])
N = 4
fs = []
for i in range(N):
    p = f"{d}/m{i}.safetensors"
    fs.append(p)
    with open(p, "wb") as f:
        for _ in range(S // N // 16):
            f.write(os.urandom(16 * MB))
        f.flush()
        os.fsync(f.fileno())
tot = sum(os.path.getsize(p) for p in fs)


def run(c):
    t = time.perf_counter()
    with ThreadPoolExecutor(c) as ex:
        list(ex.map(hash_file, fs))
    return tot / MB / (time.perf_counter() - t)


def cold():
    for p in fs:
        fd = os.open(p, os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


res = []
for c in (1, 2, 4, 8, 16):
    for s in ("warm", "cold"):
        r = []
        for _ in range(3):
            if s == "cold":
                cold()
            else:
                run(c)
            r.append(run(c))
        res.append(
            dict(
                threads=min(c, N), page_cache=s, median=round(st.median(r), 1), runs=[round(x, 1) for x in r]
            )
        )
        print(res[-1], flush=True)
json.dump(
    dict(
        bytes=tot,
        files=N,
        cpu=open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": "),
        cores=os.cpu_count(),
        py=sys.version.split()[0],
        rows=res,
    ),
    open(os.environ["OUT"] + "/h200_rehash.json", "w"),
    indent=1,
)
