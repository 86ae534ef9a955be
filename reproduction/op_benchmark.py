"""Benchmark the CARAFE / CARAFE++ reassembly paths against each other, and the CARAFE modules against the
upsamplers and downsamplers used instead (nearest, bilinear, 3x3 deconvolution, pixel shuffle and DySample for
upsampling; max / avg pooling and strided conv for downsampling).

    python scripts/bench_op.py --device cpu        # -> results/bench/op-cpu.md and op-cpu.csv
    python scripts/bench_op.py --device cuda       # -> results/bench/op-<gpu name>.md and .csv
    python scripts/bench_op.py --device cuda --dry-run   # the cases and methods it would time (no GPU needed)

For every direction (up: carafe, down: carafe_down) and feature size (at --batch, plus --batch1-sizes at batch 1,
the deployment case of one detection FPN level) it reports, per method, the median wall time of the forward pass
(inference, no autograd) and of forward + backward. All methods of a case, and a 2048² fp32 matmul, are timed in
interleaved rounds (each runs once per round, in turn), so a busy spell of a shared machine slows all of them alike;
ratios between rows of one case are the figures to compare. The two slow baselines (the reference and the naive
unfold) are timed in their own interleaved rounds after the others, at most 5, so that their seconds per call do not
cut the number of rounds the rest get. The report gives the peak memory the call allocates
beyond its inputs, and for the reassembly paths the achieved FLOP rate (papers' convention: 2 k^2 C FLOPs per
output pixel for the forward, three times that for forward + backward) as a fraction of the fp32 matrix-multiply
rate measured in the same rounds.
On CUDA it runs fp32, fp16 and bf16 (--dtypes) at (2, 256, 128, 128) and (2, 256, 64, 64) by default, and also
reports the achieved memory bandwidth of the reassembly paths (forward: features + masks read once, output written
once; forward + backward: three times that, as each gradient reads and writes as much) as a fraction of the copy
rate of the same bytes (a torch.clone of a buffer of half of them, timed in the same rounds as the case).

CPU peak memory is the rise of the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) during the call, measured in a child process started with MALLOC_MMAP_THRESHOLD_=65536 so
that freed blocks go back to the OS and earlier calls cannot hide later allocations; timings come from the parent,
whose allocator is left as it is. CUDA peak memory is torch.cuda.max_memory_allocated above the inputs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import carafe
from carafe.naive import carafe_down_unfold, carafe_unfold
from tasks.common.io import write_text_atomic
from tasks.common.provenance import REPO_ROOT, device_name, git_commit

REASSEMBLY_METHODS = ("reference", "fast", "naive unfold")
# Hundreds of times slower than the rest: timed in rounds of their own, at most SLOW_ROUNDS, so that they do not
# limit how many rounds the fast path and the modules it is compared with get within --max-case-time.
SLOW_METHODS = ("reference", "naive unfold")
SLOW_ROUNDS = 5


@dataclass
class Case:
    direction: str  # "up" or "down"
    n: int
    c: int
    h: int
    w: int
    kernel: int
    scale: int
    dtype: torch.dtype = torch.float32

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.direction == "up":
            return self.h * self.scale, self.w * self.scale
        return -(-self.h // self.scale), -(-self.w // self.scale)

    @property
    def label(self) -> str:
        name = f"{self.direction} ({self.n}, {self.c}, {self.h}, {self.w})"
        return name if self.dtype == torch.float32 else f"{name} {str(self.dtype).split('.')[-1]}"

    def forward_flops(self) -> int:
        return carafe.reassembly_flops((self.n, self.c, self.h, self.w), self.kernel, self.scale, self.direction == "up")

    def io_bytes(self, element_size: int) -> int:
        out_h, out_w = self.out_hw
        masks = self.n * self.kernel ** 2 * out_h * out_w
        return element_size * (self.n * self.c * self.h * self.w + masks + self.n * self.c * out_h * out_w)


@dataclass
class Row:
    case: str
    method: str
    forward_ms: float
    forward_backward_ms: float
    forward_repeats: int
    forward_backward_repeats: int
    peak_forward_mib: float = float("nan")
    peak_forward_backward_mib: float = float("nan")
    forward_gflops: float | None = None
    forward_backward_gflops: float | None = None
    forward_bandwidth_gbs: float | None = None
    forward_backward_bandwidth_gbs: float | None = None
    copy_gbs: float | None = None  # the clone of the same bytes in this case's rounds
    matmul_gflops: float | None = None  # the matmul rate in this case's rounds


def make_methods(case: Case, device: torch.device) -> dict[str, tuple[Callable, list[torch.Tensor]]]:
    """Each method as (fn(*inputs) -> output, inputs that need gradients), built fresh for ``case``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(case.n, case.c, case.h, case.w, generator=gen).to(device, case.dtype)
    out_h, out_w = case.out_hw
    logits = torch.randn(case.n, case.kernel ** 2, out_h, out_w, generator=gen).to(device, case.dtype)
    masks = torch.softmax(logits, dim=1)
    k, s = case.kernel, case.scale
    fast_backend = "cuda" if device.type == "cuda" else "cpu"

    def forced(backend: str, op: Callable) -> Callable:
        def run(features, kernels):
            with carafe.use_backend(backend):
                return op(features, kernels, k, 1, s)
        return run

    op = carafe.carafe if case.direction == "up" else carafe.carafe_down
    naive = carafe_unfold if case.direction == "up" else carafe_down_unfold
    methods: dict[str, tuple[Callable, list[torch.Tensor]]] = {
        "reference": (forced("reference", op), [x, masks]),
        "fast": (forced(fast_backend, op), [x, masks]),
        "naive unfold": (lambda f, m: naive(f, m, k, 1, s), [x, masks]),
    }
    if case.direction == "up":
        deconv = nn.ConvTranspose2d(case.c, case.c, 3, stride=s, padding=1, output_padding=s - 1).to(device, case.dtype)
        methods["nearest"] = (lambda f: F.interpolate(f, scale_factor=s, mode="nearest"), [x])
        methods["bilinear"] = (lambda f: F.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False), [x])
        methods["deconv 3x3"] = (deconv, [x])
        methods["pixel shuffle"] = (carafe.build_upsampler("pixel_shuffle", case.c, s).to(device, case.dtype), [x])
        methods["dysample"] = (carafe.build_upsampler("dysample", case.c, s).to(device, case.dtype), [x])
        methods["CARAFEPack"] = (carafe.CARAFEPack(case.c, s, up_kernel=k).to(device, case.dtype), [x])
    else:
        conv = nn.Conv2d(case.c, case.c, 3, stride=s, padding=1).to(device, case.dtype)
        methods["max pool 3x3"] = (lambda f: F.max_pool2d(f, 3, stride=s, padding=1), [x])
        methods["avg pool"] = (lambda f: F.avg_pool2d(f, s, stride=s, ceil_mode=True), [x])
        methods["strided conv 3x3"] = (conv, [x])
        methods["CARAFEDownPack"] = (carafe.CARAFEDownPack(case.c, s, down_kernel=k).to(device, case.dtype), [x])
    return methods


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of_one_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_call(fn: Callable[[], object], device: torch.device, min_total_s: float, max_repeats: int
              ) -> tuple[float, int]:
    """Median seconds of fn() after one warm-up call, over at least 3 calls and about min_total_s seconds."""
    medians = time_interleaved({"fn": fn}, device, min_total_s, max_repeats)
    return medians["fn"]


def time_interleaved(calls: dict[str, Callable[[], object]], device: torch.device, min_total_s: float,
                     max_repeats: int, max_rounds_s: float = float("inf")) -> dict[str, tuple[float, int]]:
    """Median seconds and repeats of each call, timed in rounds that run every call once in turn (after one warm-up
    call each): at least 3 rounds, then more until the median call has taken min_total_s in all, max_repeats rounds
    have run or the rounds have taken max_rounds_s (slow baselines such as the reference make a round long)."""
    for fn in calls.values():
        fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    rounds, started = 0, time.perf_counter()
    while rounds < 3 or (rounds < max_repeats and statistics.median(map(sum, times.values())) < min_total_s
                         and time.perf_counter() - started < max_rounds_s):
        for name, fn in calls.items():
            times[name].append(seconds_of_one_call(fn, device))
        rounds += 1
    return {name: (statistics.median(t), rounds) for name, t in times.items()}


def forward_backward(fn: Callable, inputs: list[torch.Tensor], grad_seed: dict) -> Callable[[], None]:
    leaves = [t.detach().requires_grad_() for t in inputs]

    def run() -> None:
        out = fn(*leaves)
        if "grad" not in grad_seed:
            grad_seed["grad"] = torch.randn_like(out)
        out.backward(grad_seed["grad"])
        for leaf in leaves:
            leaf.grad = None
    return run


def forward_only(fn: Callable, inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn(*inputs)
    return run


def _vm_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024


def peak_extra_bytes(run: Callable[[], None], device: torch.device) -> int:
    """Peak memory allocated during run() beyond what was live before it (after one warm-up call)."""
    run()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    base = _vm_bytes("VmRSS")
    run()
    return _vm_bytes("VmHWM") - base


MATMUL_SIZE = 2048


def matmul_call(device: torch.device) -> Callable[[], object]:
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    return lambda: a @ b


def copy_gbs(device: torch.device, mib: int = 256) -> float:
    src = torch.empty(mib * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds, _ = time_call(lambda: dst.copy_(src), device, min_total_s=1.0, max_repeats=100)
    return 2 * src.numel() * 4 / seconds / 1e9  # read + write


def parse_size(text: str) -> tuple[int, int]:
    return tuple(map(int, text.split("x"))) if "x" in text else (int(text), int(text))


def cases_for(args: argparse.Namespace) -> list[Case]:
    sizes = [(args.batch, *parse_size(s)) for s in args.sizes] + [(1, *parse_size(s)) for s in args.batch1_sizes]
    return [Case(direction, n, args.channels, h, w, args.kernel, args.scale, DTYPES[dtype])
            for dtype in args.dtypes for direction in ("up", "down") for n, h, w in sizes]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def clone_call(case: Case, device: torch.device) -> tuple[Callable[[], object], int]:
    """A torch.clone that moves the bytes of the case's forward (half read, half written), and those bytes."""
    moved = case.io_bytes(torch.empty((), dtype=case.dtype).element_size())
    buffer = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    return (lambda: buffer.clone()), 2 * (moved // 2)


def dry_run(args: argparse.Namespace) -> None:
    """The cases and methods a run would time, with the bytes behind the bandwidth figures (no timing, no GPU)."""
    for case in cases_for(args):
        size = torch.empty((), dtype=case.dtype).element_size()
        # the methods of a 4x4 map of the case (the same list, without drawing the full-size inputs)
        names = list(make_methods(replace(case, n=1, h=4, w=4), torch.device("meta")))
        print(f"{case.label:<34} k={case.kernel} σ={case.scale} forward moves {case.io_bytes(size) / 1e6:.1f} MB, "
              f"forward+backward {3 * case.io_bytes(size) / 1e6:.1f} MB; methods: {', '.join(names)}")


def memory_pass(args: argparse.Namespace, device: torch.device, argv: list[str]) -> dict[str, dict[str, list[float]]]:
    """Peak memory per case and method, from a child process on CPU given the same arguments ``argv`` (see the
    module docstring)."""
    if device.type == "cuda":
        return measure_memory(args, device)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "reproduction.op_benchmark", "--memory-only", *argv]
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the memory pass failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_memory(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, list[float]]]:
    peaks: dict[str, dict[str, list[float]]] = {}
    for case in cases_for(args):
        peaks[case.label] = {}
        for name, (fn, inputs) in make_methods(case, device).items():
            fwd = peak_extra_bytes(forward_only(fn, inputs), device)
            fwd_bwd = peak_extra_bytes(forward_backward(fn, inputs, {}), device)
            peaks[case.label][name] = [fwd / 2 ** 20, fwd_bwd / 2 ** 20]
    return peaks


def report_stem(device: torch.device) -> str:
    if device.type == "cpu":
        return "op-cpu"
    return "op-" + re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or value != value else format(value, spec)


def render_markdown(rows: list[Row], header: dict[str, str], matmul: float, copy: float | None,
                    headline: list[str]) -> str:
    out = io.StringIO()
    out.write(f"# Reassembly operator benchmark: {header['device']}\n\n")
    for key, value in header.items():
        out.write(f"- **{key}**: {value}\n")
    out.write(f"- **fp32 matmul rate (2048², timed in every case's rounds; median over cases)**: "
              f"{matmul:.1f} GFLOP/s\n")
    if copy is not None:
        out.write(f"- **device-to-device copy (same run)**: {copy:.1f} GB/s\n")
    out.write("\nTimes are medians of interleaved rounds (rounds in brackets); forward is inference (no autograd); "
              "peak is memory allocated beyond the inputs during the call. FLOP rates use the papers' count (forward "
              "2·k²·C per output pixel; forward+backward 3× that), as a fraction of the matmul rate timed in the "
              "same rounds.\n\n")
    if headline:
        out.write("## Headline\n\n" + "".join(f"- {line}\n" for line in headline) + "\n")
    bandwidth = copy is not None
    for case in dict.fromkeys(r.case for r in rows):
        out.write(f"## {case}\n\n")
        case_matmul = next(r.matmul_gflops for r in rows if r.case == case)
        out.write(f"fp32 matmul in these rounds: {case_matmul:.1f} GFLOP/s\n\n")
        cols = ["method", "forward ms", "fwd+bwd ms", "peak fwd MiB", "peak fwd+bwd MiB", "fwd GFLOP/s (× matmul)",
                "fwd+bwd GFLOP/s (× matmul)"] + (["fwd bandwidth (× copy)", "fwd+bwd bandwidth (× copy)"]
                                                 if bandwidth else [])
        out.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in (r for r in rows if r.case == case):
            cells = [r.method, f"{r.forward_ms:.2f} ({r.forward_repeats})",
                     f"{r.forward_backward_ms:.2f} ({r.forward_backward_repeats})",
                     fmt(r.peak_forward_mib, ".1f"), fmt(r.peak_forward_backward_mib, ".1f")]
            for rate in (r.forward_gflops, r.forward_backward_gflops):
                cells.append("–" if rate is None else f"{rate:.2f} ({rate / r.matmul_gflops:.3f})")
            if bandwidth:
                for bw in (r.forward_bandwidth_gbs, r.forward_backward_bandwidth_gbs):
                    cells.append("–" if bw is None else f"{bw:.0f} GB/s ({bw / r.copy_gbs:.2f})")
            out.write("| " + " | ".join(cells) + " |\n")
        out.write("\n")
    return out.getvalue()


def headline_lines(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """Per case: the fast path against the naive unfold and the reference (forward+backward, memory), its forward
    as a fraction of the matmul rate, and the CARAFE module against DySample / a strided 3x3 convolution."""
    lines = []
    for case in dict.fromkeys(r.case for r in rows):
        by_method = {r.method: r for r in rows if r.case == case}
        if not {"fast", "naive unfold", "reference"} <= by_method.keys():
            continue
        fast, naive, ref = by_method["fast"], by_method["naive unfold"], by_method["reference"]
        line = (f"{case}, k={args.kernel}, σ={args.scale}: the op's forward reaches "
                f"{fast.forward_gflops / fast.matmul_gflops:.1%} of the matmul rate (forward+backward "
                f"{fast.forward_backward_gflops / fast.matmul_gflops:.1%}); fast path forward+backward "
                f"{naive.forward_backward_ms / fast.forward_backward_ms:.1f}× faster than the naive unfold "
                f"formulation and {ref.forward_backward_ms / fast.forward_backward_ms:.1f}× faster than the reference")
        for module, rival in (("CARAFEPack", "dysample"), ("CARAFEDownPack", "strided conv 3x3")):
            if {module, rival} <= by_method.keys():
                mod, riv = by_method[module], by_method[rival]
                line += (f"; {module} takes {mod.forward_ms / riv.forward_ms:.2f}× {rival}'s time for inference and "
                         f"{mod.forward_backward_ms / riv.forward_backward_ms:.2f}× for forward+backward")
        lines.append(line)
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with the defaults of its device filled in; exits with the reason on a bad one."""
    parser = argparse.ArgumentParser(prog="bench_op.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--sizes", nargs="+", default=None,
                        help="feature sizes H (square) or HxW; default 16 32 64 128 on CPU, "
                             "32 64 128 200 100x152 on CUDA")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batch1-sizes", nargs="*", default=None,
                        help="feature sizes timed at batch 1 as well (default 100x152, a detection FPN level)")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch / kernel threads on CPU (default 2)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per measurement")
    parser.add_argument("--max-repeats", type=int, default=30)
    parser.add_argument("--max-case-time", type=float, default=60.0,
                        help="seconds after which a case stops adding rounds (it always runs 3)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "results" / "bench")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="dtypes of the features and masks (default: float32 on CPU; float32 float16 bfloat16 "
                             "on CUDA)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the cases and methods that would be timed and exit (needs no GPU)")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        parser.error("--device cuda given but torch.cuda.is_available() is False")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.sizes is None:
        args.sizes = ["16", "32", "64", "128"] if device.type == "cpu" else ["128", "64"]
    if args.batch1_sizes is None:
        args.batch1_sizes = ["100x152"] if device.type == "cpu" else []
    if args.dtypes is None:
        args.dtypes = ["float32"] if device.type == "cpu" else ["float32", "float16", "bfloat16"]
    if device.type == "cpu" and args.dtypes != ["float32"]:
        parser.error("--dtypes other than float32 are for --device cuda (the CPU kernels are float32 / float64)")
    return args


def time_cases(args: argparse.Namespace, device: torch.device) -> tuple[list[Row], float | None]:
    """Every case's methods timed in interleaved rounds (the rows, without peak memory) and the copy rate (CUDA)."""
    matmul = matmul_call(device)
    copy = copy_gbs(device) if device.type == "cuda" else None
    if copy:
        print(f"copy: {copy:.1f} GB/s", flush=True)
    rows: list[Row] = []
    cases = cases_for(args)
    for i, case in enumerate(cases, 1):
        methods = make_methods(case, device)
        calls: dict[str, Callable[[], object]] = {"matmul": matmul}
        if device.type == "cuda":
            calls["clone"], clone_bytes = clone_call(case, device)
        slow_calls: dict[str, Callable[[], object]] = {}
        for name, (fn, inputs) in methods.items():
            group = slow_calls if name in SLOW_METHODS else calls
            group[f"{name}|forward"] = forward_only(fn, inputs)
            group[f"{name}|forward+backward"] = forward_backward(fn, inputs, {})
        medians = time_interleaved(calls, device, args.min_time, args.max_repeats, args.max_case_time)
        medians.update(time_interleaved(slow_calls, device, args.min_time, min(SLOW_ROUNDS, args.max_repeats),
                                         args.max_case_time))
        case_matmul = 2 * MATMUL_SIZE ** 3 / medians["matmul"][0] / 1e9
        print(f"[{i}/{len(cases)}] {case.label:<24} fp32 matmul {case_matmul:.1f} GFLOP/s", flush=True)
        for name, (fn, inputs) in methods.items():
            (fwd, fwd_n), (fb, fb_n) = medians[f"{name}|forward"], medians[f"{name}|forward+backward"]
            row = Row(case.label, name, fwd * 1e3, fb * 1e3, fwd_n, fb_n, matmul_gflops=case_matmul)
            if name in REASSEMBLY_METHODS:
                row.forward_gflops = case.forward_flops() / fwd / 1e9
                row.forward_backward_gflops = 3 * case.forward_flops() / fb / 1e9
                if copy is not None:
                    moved = case.io_bytes(inputs[0].element_size())
                    row.forward_bandwidth_gbs = moved / fwd / 1e9
                    row.forward_backward_bandwidth_gbs = 3 * moved / fb / 1e9
                    row.copy_gbs = clone_bytes / medians["clone"][0] / 1e9
            rows.append(row)
            print(f"[{i}/{len(cases)}] {case.label:<24} {name:<18} fwd {row.forward_ms:9.2f} ms   "
                  f"fwd+bwd {row.forward_backward_ms:9.2f} ms", flush=True)
    return rows, copy


def write_report(rows: list[Row], args: argparse.Namespace, device: torch.device, copy: float | None,
                 argv: list[str], seconds: float) -> Path:
    """``results/bench/<stem>.md`` and ``.csv`` (written atomically); prints the headline lines; the markdown's path."""
    headline = headline_lines(rows, args)
    matmul_rate = statistics.median(r.matmul_gflops for r in rows)
    header = {
        "device": device_name(device),
        "threads": str(torch.get_num_threads()) if device.type == "cpu" else "n/a (GPU)",
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/bench_op.py " + " ".join(argv),
        "settings": f"N={args.batch}, C={args.channels}, k={args.kernel}, σ={args.scale}, "
                    + ", ".join(args.dtypes),
        "wall time": f"{seconds:.0f} s",
    }
    stem = report_stem(device)
    markdown = args.out_dir / f"{stem}.md"
    write_text_atomic(markdown, render_markdown(rows, header, matmul_rate, copy, headline))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(asdict(rows[0])), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    write_text_atomic(args.out_dir / f"{stem}.csv", buf.getvalue())
    for line in headline:
        print(line)
    return markdown


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.dry_run:
        dry_run(args)
        return
    torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(measure_memory(args, device)))
        return
    started = time.time()
    print(f"benchmarking on {device_name(device)} with {torch.get_num_threads()} threads", flush=True)
    rows, copy = time_cases(args, device)
    print("measuring peak memory ...", flush=True)
    peaks = memory_pass(args, device, argv)
    for row in rows:
        row.peak_forward_mib, row.peak_forward_backward_mib = peaks[row.case][row.method]
    markdown = write_report(rows, args, device, copy, argv, time.time() - started)
    print(f"wrote {markdown.with_suffix('')}.md and .csv")


if __name__ == "__main__":
    main()
