"""Print a pytest-benchmark JSON file as markdown: per group, median times and ratios.

    python benchmarks/summarize.py benchmarks/results/<file>.json

The ratio column is each variant's median over the ue_fast variant's median
(> 1: ue_fast is faster). Where a benchmark recorded ``floor_s`` (floors.py), the
last column is its time over that floor, the time being triton's do_bench median
where one was recorded (CUDA), else the pytest-benchmark median. ``ms / image`` is
shown where a benchmark recorded ``ms_per_image`` (bench_methods.py).
"""
import json
import sys
from collections import defaultdict


def variant_of(bench) -> str:
    return bench.get("extra_info", {}).get("variant") or bench["name"]


def markdown(data: dict) -> str:
    """The summary of a pytest-benchmark result document, as markdown."""
    mi = data.get("machine_info", {})
    lines = [f"device: {mi.get('device')}, torch {mi.get('torch')}, triton {mi.get('triton')}, "
             f"commit {mi.get('commit')}, {data.get('datetime', '')}", ""]
    for dev, c in (mi.get("ceilings") or {}).items():
        lines += [f"ceilings on {dev}: copy {c['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + written), "
                  f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.3g} TFLOP/s (n = {c['matmul_n']})", ""]
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b.get("group") or b["name"]].append(b)
    for group, benches in groups.items():
        base = next((b for b in benches if variant_of(b) == "ue_fast"), None)
        lines += [f"### {group}", "",
                  "| variant | median | do_bench median | ms / image | peak memory | x ue_fast | over floor |",
                  "|---|---|---|---|---|---|---|"]
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            med = b["stats"]["median"]
            ex = b.get("extra_info", {})
            ratio = f"{med / base['stats']['median']:.1f}x" if base else "-"
            dob = ex.get("do_bench_median_ms")
            dob_s = dob * 1e-3 if dob is not None else None
            floor = f"{(dob_s or med) / ex['floor_s']:.1f}x" if ex.get("floor_s") else "-"
            mem = ex.get("peak_mem_bytes")
            mem = f"{mem / 2**20:.1f} MiB" if mem is not None else "-"
            per_image = f"{ex['ms_per_image']:.3g}" if ex.get("ms_per_image") is not None else "-"
            lines.append(f"| {variant_of(b)} | {_fmt(med)} | {_fmt(dob_s) if dob_s else '-'} | {per_image} | "
                         f"{mem} | {ratio} | {floor} |")
        lines.append("")
    return "\n".join(lines)


def main(path: str) -> None:
    with open(path) as f:
        print(markdown(json.load(f)))


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


if __name__ == "__main__":
    main(sys.argv[1])
