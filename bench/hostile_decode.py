"""Time and peak memory of decoding issue 28 item 4's hostile images, before and after the fix.

Cases (built by tests/hostile_images.py, written to a temporary folder):
- `jpeg-scans`: a grey 7000x7000 progressive JPEG with 20,000 extra scans (about 1.1 MB);
- `tiff-strips`: an 8x8 TIFF declaring 10,000,000 strips (80 MB: offsets and byte counts);
- `jpeg-segments`: a small JPEG with 2,000,000 empty APP1 segments (8 MB), read by Pillow in Python;
- `photo`: a 4000x3000 progressive JPEG of noise, the cost of an ordinary picture (the helper
  process's overhead shows here).

Each case runs in a fresh child process per implementation: `images.image_from_bytes` of the
file's bytes, with `PYTHONPATH` set to the code under test (`--before`, default /work/main, and
this checkout). The child reports its wall time, the outcome (the image size, or the one-line
error), and its peak resident memory, the larger of its own and its decoder helper's (VmHWM; a killed
helper's ru_maxrss: the fixed code decodes in a helper process), minus what it held after the imports (so the
fixed code's figure includes the helper's own start-up, about 30 MB). `--quick` divides
the counts by 10. Run from the repository root: `python bench/hostile_decode.py [--quick]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, resource, sys, time
from llava_cli.media.images import image_from_bytes
from llava_cli.base.errors import InputError
import PIL.Image, numpy
def hwm_kb(pid):  # the peak resident memory of one process's own memory (ru_maxrss keeps the parent's from before exec)
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
def helper_pids():  # the fixed code's helper processes, alive
    try:
        from llava_cli.media.decodepool import POOL
    except ImportError:
        return []
    return [helper.process.pid for helper in POOL.idle]
def peak_mb():
    killed = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # a helper killed at the budget
    return max(hwm_kb("self"), killed, *map(hwm_kb, helper_pids())) / 1024
data = open(sys.argv[1], "rb").read()
before = peak_mb()
started = time.perf_counter()
try:
    outcome = "decoded %dx%d" % image_from_bytes(data, "case", 50_000_000).image.size
except InputError as err:
    outcome = "refused: " + str(err)[:70]
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": peak_mb() - before, "outcome": outcome}))
"""


def build_cases(folder: Path, quick: bool) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    from hostile_images import many_scan_jpeg, many_strip_tiff
    from PIL import Image

    divide = 10 if quick else 1
    small = io.BytesIO()
    Image.new("L", (64, 64), 128).save(small, "JPEG")
    small = small.getvalue()
    photo = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photo, "JPEG", progressive=True, quality=90)
    contents = {
        "photo 4000x3000 progressive JPEG": photo.getvalue(),
        f"jpeg-scans 7000x7000, {20_000 // divide:,} scans": many_scan_jpeg(7000, 20_000 // divide),
        f"tiff-strips 8x8, {10_000_000 // divide:,} strips": many_strip_tiff(10_000_000 // divide),
        f"jpeg-segments, {2_000_000 // divide:,} empty APP1": small[:2]
        + b"\xff\xe1\x00\x02" * (2_000_000 // divide)
        + small[2:],
    }
    paths = {}
    for index, (name, data) in enumerate(contents.items()):
        paths[name] = folder / f"case{index}"
        paths[name].write_bytes(data)
    return paths


def measure(code: Path, path: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env, timeout=timeout, cwd=code
        )  # `python -c` puts the working folder first on sys.path
    except subprocess.TimeoutExpired:
        return {"seconds": timeout, "peak_mb": float("nan"), "outcome": f"still decoding after {timeout:g} s (killed)"}
    if done.returncode != 0:
        return {
            "seconds": float("nan"),
            "peak_mb": float("nan"),
            "outcome": f"crashed: {done.stderr.strip().splitlines()[-1:]}",
        }
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=Path("/work/main"), help="checkout of the code before the fix")
    parser.add_argument("--quick", action="store_true", help="a tenth of the scans and strips")
    parser.add_argument("--only", help="run only the cases whose name starts with this")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a decode is given up")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cases = build_cases(Path(folder), args.quick)
        print("| case | bytes | before: s | before: peak MB | after: s | after: peak MB | time ratio | after |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for name, path in cases.items():
            if args.only and not name.startswith(args.only):
                continue
            before = measure(args.before, path, args.timeout)
            after = measure(ROOT, path, args.timeout)
            ratio = before["seconds"] / after["seconds"] if after["seconds"] else float("nan")
            print(
                f"| {name} | {path.stat().st_size:,} | {before['seconds']:.2f} | {before['peak_mb']:.0f} | "
                f"{after['seconds']:.2f} | {after['peak_mb']:.0f} | {ratio:.1f}x | {after['outcome']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
