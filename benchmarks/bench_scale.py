"""Bounded memory, measured: protect N CIFAR-10 images upscaled to 64x64, in memory and on disk.

For each N (default 2,000, 8,000 and 32,000, class-balanced from the CIFAR-10 tarball)
the script writes the JPEGs to a folder once, then runs the command line

    python -m ue_fast protect IN OUT --resize 64 --store {memory|disk} ...

(MI-UE, cnn-small surrogate, one round: a surrogate epoch and 2 PGD steps per batch) as
a child process, sampling the memory of the whole process tree (the CLI and its decoding
workers) every 20 ms from /proc: PSS (shared pages split among the processes sharing
them, so forked workers are not counted twice) and RSS. It records the peaks, the
generation images/s of the manifest (images x rounds / seconds of surrogate training and
PGD), the ingest's decode images/s and the wall time. On disk the run gets
``--memory-budget 64M``, so poison.pt (N x 48 KiB of float32) is not written either.

The allocator. With glibc's defaults the peak is mostly the allocator's, not the data's:
its dynamic mmap threshold rises as large buffers are freed, after which the surrogate's
activation buffers (tens of MB, allocated and freed every batch) come from heap arenas
that are kept, fragmented, across batches, so the peak drifts up with the number of
batches, by 100-200 MB at these sizes. ``--allocator fixed`` (the default) runs the
children with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at 128 KiB, so
every large buffer is returned when freed and the peak measures what the process
holds (it costs about 10% of speed on the CPU, in both stores alike);
``--allocator default`` measures what a default process shows. Both can be given.

The issue's bar, checked on the ``fixed`` rows and printed: on disk, peak PSS grows by at
most 50 MB from the smallest to the largest N, at no less than 90% of the in-memory
images/s at each N.

    python benchmarks/bench_scale.py --out benchmarks/results/cpu-2core-<date>-scale

``--layouts`` gives the same images to protect as other inputs too: ``webdataset`` (tar
shards of 1,000 samples, ``<key>.jpg`` + ``<key>.cls``), ``parquet`` (one file, image bytes
and labels, row groups of 1,000) and ``lmdb`` (folder2lmdb's keys-list layout), each written
by chunks from the folder; the same bar (peak PSS flat in N on disk) holds per layout.
``--method`` swaps MI-UE for another (``ops``: training-free, so the rows show the I/O
path's memory alone, in a fraction of the time).

Writes <out>.json and <out>.md. Linux only (/proc). About 25 minutes on 2 CPU cores per
allocator setting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARBALL = HERE.parents[1] / "shared" / "data" / "cifar10-jpeg.tar.gz"
SETTINGS = ["--method", "miue", "--arch", "cnn-small", "--epochs", "1", "--pgd-steps", "2", "--batch-size", "128",
            "--poison-batch-size", "256", "--resize", "64", "--device", "cpu", "--no-progress"]


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Peak PSS and RSS (bytes) of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            pids = _tree(self.pid)
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) * 1024
            rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids) * 1024
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()


def make_folder(tarball: Path, n: int, dst: Path) -> Path:
    """n class-balanced CIFAR-10 training JPEGs as dst/<class>/<file>."""
    sys.path.insert(0, str(HERE.parent))
    from ue_fast.data.cifar import read_members, select_members

    if n % 10:
        raise ValueError(f"N must be a multiple of 10 (class-balanced), got {n}")
    chosen = select_members(tarball, "train", n // 10)
    for (c, m), blob in zip(chosen, read_members(tarball, [m for _, m in chosen])):
        (dst / c).mkdir(parents=True, exist_ok=True)
        (dst / c / os.path.basename(m.name)).write_bytes(blob)
    return dst


def make_layout(folder: Path, layout: str, dst: Path) -> str:
    """The images of ``folder`` (its sorted order) as a WebDataset, Parquet or LMDB input under
    ``dst``, written by chunks of 1,000; returns what to pass to protect."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    classes = sorted({p.parent.name for p in files})
    labels = [classes.index(p.parent.name) for p in files]
    dst.mkdir(parents=True, exist_ok=True)
    chunk = 1000
    if layout == "webdataset":
        import io
        import tarfile

        for s, a in enumerate(range(0, len(files), chunk)):
            with tarfile.open(dst / f"train-{s:06d}.tar", "w") as tar:
                for i in range(a, min(len(files), a + chunk)):
                    for name, payload in ((f"{i:07d}.jpg", files[i].read_bytes()),
                                          (f"{i:07d}.cls", str(labels[i]).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        return str(dst / f"train-{{000000..{(len(files) - 1) // chunk:06d}}}.tar")
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("image", pa.binary()), ("label", pa.int64())])
        with pq.ParquetWriter(dst / "train.parquet", schema) as w:
            for a in range(0, len(files), chunk):
                w.write_table(pa.table({"image": [f.read_bytes() for f in files[a:a + chunk]],
                                        "label": labels[a:a + chunk]}, schema=schema))
        return str(dst / "train.parquet")
    if layout == "lmdb":
        import pickle

        import lmdb

        env = lmdb.open(str(dst / "train.lmdb"), map_size=1 << 34, subdir=True)
        keys = [f"{i}".encode() for i in range(len(files))]
        for a in range(0, len(files), chunk):
            with env.begin(write=True) as txn:
                for i in range(a, min(len(files), a + chunk)):
                    txn.put(keys[i], pickle.dumps((files[i].read_bytes(), labels[i])))
        with env.begin(write=True) as txn:
            txn.put(b"__keys__", pickle.dumps(keys))
            txn.put(b"__len__", pickle.dumps(len(keys)))
        env.close()
        return str(dst / "train.lmdb")
    raise ValueError(f"unknown layout {layout!r}")


FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def settings(method: str) -> list[str]:
    """SETTINGS for MI-UE; another method with its defaults at the same size and device."""
    if method == "miue":
        return SETTINGS
    return ["--method", method, "--resize", "64", "--device", "cpu", "--no-progress"]


def run_one(src, out: Path, store: str, allocator: str, layout: str = "folder", method: str = "miue") -> dict:
    extra = ["--store", store] + (["--memory-budget", "64M"] if store == "disk" else [])
    cmd = [sys.executable, "-m", "ue_fast", "protect", str(src), str(out), *settings(method), *extra]
    env = {k: v for k, v in os.environ.items() if k not in FIXED_MALLOC}
    if allocator == "fixed":
        env.update(FIXED_MALLOC)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    mem = TreeMemory(proc.pid)
    log, _ = proc.communicate()
    mem.stop()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-3000:]}")
    m = json.loads((out / "manifest.json").read_text())
    return dict(layout=layout, method=method, store=store, allocator=allocator, n=m["num_images"], peak_pss_mb=mem.peak_pss / 1e6, peak_rss_mb=mem.peak_rss / 1e6,
                images_per_s=m["images_per_s"], decode_images_per_s=m["ingest"]["images_per_s"],
                decode_workers=m["ingest"]["workers"], wall_s=wall, generation_s=m["generation_s"],
                delta_on=m["delta_store"]["on"], images_on=m["delta_store"]["images_on"],
                poison_pt_written=m["outputs"]["poison.pt"]["written"],
                command=" ".join(["python", *cmd[1:4], "IN", "OUT", *cmd[6:]]))


def verdict(rows: list[dict], allocator: str, layout: str = "folder") -> dict:
    rows = [r for r in rows if r["allocator"] == allocator and r.get("layout", "folder") == layout]
    disk = sorted((r for r in rows if r["store"] == "disk"), key=lambda r: r["n"])
    mem = {r["n"]: r for r in rows if r["store"] == "memory"}
    if len(disk) < 2:
        return {}
    growth = disk[-1]["peak_pss_mb"] - disk[0]["peak_pss_mb"]
    ratios = {r["n"]: r["images_per_s"] / mem[r["n"]]["images_per_s"] for r in disk if r["n"] in mem}
    return dict(allocator=allocator, layout=layout, disk_pss_growth_mb=growth, memory_flat=growth <= 50,
                speed_ratio_disk_vs_memory=ratios, speed_ok=all(v >= 0.9 for v in ratios.values()) if ratios else None)


def write_md(path: Path, rows: list[dict], verdicts: list[dict], meta: dict) -> None:
    lines = [f"# Memory and speed at scale: {meta['machine']}, {meta['date']}", "",
             "MI-UE rows: cnn-small surrogate, one round (a surrogate epoch + 2 PGD steps per batch); other "
             "methods with their defaults. CIFAR-10 training JPEGs resized to 64x64 at ingest, given as the "
             "input of each row (a folder, WebDataset shards, a Parquet file, an LMDB environment). Peak memory of the whole process tree (the CLI and "
             "its decoding workers), sampled every 20 ms.", "",
             f"Command: `{meta['command']}`. Allocator: see the script's docstring (fixed: glibc's mmap "
             "threshold at 128 KiB, so freed buffers go back to the system; default: glibc's defaults).", "",
             "| input | method | N | store | allocator | peak PSS MB | peak RSS MB | generation img/s | "
             "decode img/s (workers) | wall s | poison.pt |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("layout", "folder"), r["allocator"], r["n"], r["store"])):
        lines.append(f"| {r.get('layout', 'folder')} | {r.get('method', 'miue')} | {r['n']} | {r['store']} | "
                     f"{r['allocator']} | {r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['images_per_s']:.0f} | {r['decode_images_per_s']:.0f} ({r['decode_workers']}) | "
                     f"{r['wall_s']:.0f} | {'yes' if r['poison_pt_written'] else 'no'} |")
    lines.append("")
    for v in verdicts:
        ratios = ", ".join(f"N={n}: {x:.3f}" for n, x in v["speed_ratio_disk_vs_memory"].items())
        speed = ("" if not ratios else f"; disk images/s over memory images/s: {ratios} (bar: 0.9): "
                 f"{'met' if v['speed_ok'] else 'NOT met'}")
        lines += [f"- {v['layout']}, allocator {v['allocator']}: on disk, peak PSS grows by "
                  f"{v['disk_pss_growth_mb']:.1f} MB from the smallest to the largest N (bar: 50 MB): "
                  f"{'met' if v['memory_flat'] else 'NOT met'}{speed}."]
    lines += ["", f"torch {meta['torch']}, Python {meta['python']}, {meta['cpus']} CPUs."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tarball", type=Path, default=TARBALL)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--stores", nargs="+", default=["memory", "disk"], choices=["memory", "disk"])
    ap.add_argument("--allocator", nargs="+", default=["fixed"], choices=["fixed", "default"],
                    help="glibc settings of the runs (see the docstring); several: each one")
    ap.add_argument("--layouts", nargs="+", default=["folder"], choices=["folder", "webdataset", "parquet", "lmdb"],
                    help="the inputs the same images are protected from (default folder)")
    ap.add_argument("--method", default="miue", help="the method (default miue with SETTINGS; ops: no training)")
    ap.add_argument("--out", type=Path, required=True, help="results path without extension (.json and .md)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if not args.tarball.exists():
        ap.error(f"CIFAR-10 tarball not found: {args.tarball} (pass --tarball)")
    work = Path(tempfile.mkdtemp(prefix="bench_scale_")) if args.work is None else args.work
    rows = []
    try:
        for n in args.sizes:
            src = make_folder(args.tarball, n, work / f"in-{n}")
            for layout in args.layouts:
                given = src if layout == "folder" else make_layout(src, layout, work / f"in-{n}-{layout}")
                for allocator in args.allocator:
                    for store in args.stores:
                        r = run_one(given, work / f"out-{n}-{store}", store, allocator, layout, args.method)
                        shutil.rmtree(work / f"out-{n}-{store}")
                        print(json.dumps(r), flush=True)
                        rows.append(r)
                if layout != "folder":
                    shutil.rmtree(work / f"in-{n}-{layout}")
            shutil.rmtree(src)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    meta = dict(machine=f"cpu-{os.cpu_count()}core", date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                python=platform.python_version(), cpus=os.cpu_count(),
                command="python benchmarks/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    verdicts = [v for v in (verdict(rows, a, lay) for lay in args.layouts for a in args.allocator) if v]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(dict(meta=meta, rows=rows, verdicts=verdicts), indent=2) + "\n")
    write_md(Path(f"{args.out}.md"), rows, verdicts, meta)
    print(json.dumps(verdicts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
