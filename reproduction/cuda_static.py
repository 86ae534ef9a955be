"""Static performance report of the CUDA kernels, from the compiled code (no GPU needed): ``scripts/bench_cuda_static.py``.

    python scripts/bench_cuda_static.py                      # -> results/bench/cuda-static.md and .json
    python scripts/bench_cuda_static.py --before results/bench/cuda-static-before.json

For every exported kernel and dtype, compiled by nvcc for sm_80 and sm_90 from the same source text and options the
loader hands NVRTC (carafe.backends.cuda.kernel_source / compile_options):

- registers, stack and spill bytes (ptxas -v) and shared memory;
- occupancy at the launch configuration the loader uses (threads per block from carafe.backends.cuda), from the
  documented per-SM limits of compute capability 8.0 and 9.0 (CUDA C++ Programming Guide, "Compute Capabilities"
  table: 64 resident warps, 32 resident blocks, 65536 32-bit registers allocated per warp in units of 256, 164 KB /
  228 KB shared memory with 1 KB reserved per block), computed the way the CUDA occupancy calculator does;
- the inner loops of the SASS (cuobjdump -sass): every innermost loop (a backward branch whose body holds no other
  backward branch) that contains fused multiply-adds, with its instructions, FMAs (FFMA / DFMA / HFMA2) and
  global loads, and instructions per FMA; the kernel's figure is its loop with the most FMAs (the hot loop; ties:
  the one with the most instructions per FMA, the pessimistic choice).

And a memory-traffic model of each kernel at the benchmark shapes: the bytes it must move (each input element read
once, each output element written once) against the bytes its access pattern moves between L2 and the SMs, counted
by running the kernels' own per-thread code on the host with every load and store recorded
(tests/cuda_host_harness.cpp built with -DCARAFE_TRACE): the distinct 32-byte sectors each thread block touches,
i.e. perfect reuse inside a block (its L1) and none between blocks. Blocks are sampled evenly over the grid.

With --before JSON (a report of an earlier commit, written by this script's --json), the tables show both.
Nothing here is a GPU timing; the estimates in the report are derived from these counts.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from carafe.backends import cuda as cuda_backend
from tasks.common.io import write_text_atomic

REPO = Path(__file__).resolve().parent.parent

ARCHES = ("sm_80", "sm_90")
# Per-SM limits (CUDA C++ Programming Guide, compute capabilities 8.0 and 9.0).
SM_LIMITS = {
    "sm_80": dict(warps=64, blocks=32, registers=65536, register_unit=256, shared=164 * 1024, reserved_shared=1024),
    "sm_90": dict(warps=64, blocks=32, registers=65536, register_unit=256, shared=228 * 1024, reserved_shared=1024),
}
FMA_OPCODES = ("FFMA", "DFMA", "HFMA2")
# (N, C, H, W) of the benchmark (scripts/bench_op.py --device cuda), k = 5, sigma = 2, one group.
SHAPES = ((2, 256, 128, 128), (2, 256, 64, 64))
KERNEL_SIZE, SCALE = 5, 2
TRAFFIC_DTYPES = (torch.float32, torch.float16)
TRAFFIC_SAMPLES = 48
# Layouts of the traffic model: NCHW, and channels_last everywhere (the NHWC kernels), if the kernels have them.
LAYOUTS = tuple(getattr(cuda_backend, "LAYOUTS", ("nchw",)))


def tool(name: str) -> str:
    """A CUDA binary tool: on PATH, or the copy shipped in the triton wheel (cuobjdump / nvdisasm)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    raise SystemExit(f"{name} not found: put the CUDA toolkit's bin folder on PATH")


@dataclass
class Loop:
    start: int
    end: int
    instructions: int
    fmas: int
    loads: int
    opcodes: dict[str, int] = field(default_factory=dict)

    @property
    def per_fma(self) -> float:
        return self.instructions / self.fmas


@dataclass
class KernelFigures:
    name: str
    arch: str
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    shared: int
    threads: int
    blocks_per_sm: int
    occupancy: float
    limiter: str
    loops: list[Loop]

    @property
    def hot_loop(self) -> Loop | None:
        if not self.loops:
            return None
        return max(self.loops, key=lambda lp: (lp.fmas, lp.per_fma))


def occupancy(arch: str, registers: int, threads: int, shared: int) -> tuple[int, float, str]:
    """Resident blocks per SM, the fraction of the SM's warps they fill, and what limits them."""
    lim = SM_LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // lim["register_unit"]) * lim["register_unit"]
    limits = {"warps": lim["warps"] // warps, "blocks": lim["blocks"],
              "registers": (lim["registers"] // per_warp) // warps if registers else lim["blocks"],
              "shared memory": lim["shared"] // (shared + lim["reserved_shared"])}
    blocks = min(limits.values())
    limiter = min(limits, key=limits.get)
    return blocks, blocks * warps / lim["warps"], limiter


_PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _PTXAS_FUNCTION.search(line):
            current = out.setdefault(m.group(1), {})
        elif current is not None and (m := _PTXAS_FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current.update(registers=int(m.group(1)), shared=int(m.group(2) or 0))
    return out


_SASS_FUNCTION = re.compile(r"^\s*Function : (\w+)")
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """Function name -> [(address, instruction text)] from cuobjdump -sass."""
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        if m := _SASS_FUNCTION.match(line):
            current = functions.setdefault(m.group(1), [])
        elif current is not None and (m := _SASS_LINE.match(line)):
            current.append((int(m.group(1), 16), m.group(2)))
    return functions


def opcode(instruction: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", instruction)  # drop a predicate guard
    return text.split()[0] if text else ""


def inner_loops(instructions: list[tuple[int, str]]) -> list[Loop]:
    """Innermost loops that contain an FMA: backward branches [target, branch] with no other backward branch
    strictly inside."""
    spans = []
    for address, text in instructions:
        if opcode(text) in ("BRA", "BRA.U") or opcode(text).startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
            if m and int(m.group(1), 16) <= address:
                spans.append((int(m.group(1), 16), address))
    loops = []
    for start, end in spans:
        if any(s >= start and e <= end and (s, e) != (start, end) for s, e in spans):
            continue
        body = [opcode(t) for a, t in instructions if start <= a <= end]
        counts: dict[str, int] = {}
        for op in body:
            base = op.split(".")[0]
            counts[base] = counts.get(base, 0) + 1
        # HFMA2.MMA with zero operands is the compiler's move-immediate idiom, not arithmetic.
        fmas = sum(counts.get(op, 0) for op in FMA_OPCODES) - sum(1 for op in body if op.startswith("HFMA2.MMA"))
        if fmas:
            loads = sum(v for k, v in counts.items() if k in ("LDG", "LD", "LDS"))
            loops.append(Loop(start, end, len(body), fmas, loads, dict(sorted(counts.items()))))
    return loops


def compile_kernels(arch: str, source: str, workdir: Path, suffix: str | None) -> list[KernelFigures]:
    """nvcc the loader's source for ``arch`` (one dtype's kernels, or all if the source predates per-dtype
    modules); resources, occupancy and inner loops of every kernel."""
    src = workdir / "carafe_kernels.cu"
    if not src.exists():
        src.write_text(source)
    cubin = workdir / f"kernels_{arch}_{suffix}.cubin"
    includes = [f"-I{d}" for d in cuda_backend.cuda_include_dirs()]
    defines = [f"-DCARAFE_ONLY_{suffix.upper()}"] if suffix else []
    cmd = [tool("nvcc"), "-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", *includes, *defines, str(src),
           "-o", str(cubin)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"nvcc failed for {arch}:\n{result.stderr}")
    resources = parse_ptxas(result.stderr + result.stdout)
    sass = parse_sass(subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                                     check=True).stdout)
    figures = []
    for name in sorted(resources):
        r = resources[name]
        threads = cuda_backend.THREADS_PER_BLOCK
        blocks, occ, limiter = occupancy(arch, r["registers"], threads, r.get("shared", 0))
        figures.append(KernelFigures(name, arch, r["registers"], r.get("stack", 0), r.get("spill_stores", 0),
                                     r.get("spill_loads", 0), r.get("shared", 0), threads, blocks, occ, limiter,
                                     inner_loops(sass.get(name, []))))
    return figures


def nvcc_version() -> str:
    out = subprocess.run([tool("nvcc"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"nvcc {m.group(1)} ({m.group(2)})" if m else out.strip().splitlines()[-1]


# --- memory-traffic model ------------------------------------------------------------------------------------------

def build_trace_harness(workdir: Path) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise SystemExit("g++ is needed for the memory-traffic model (the host build of the kernels' code)")
    library = workdir / "trace.so"
    cmd = [cxx, "-std=c++17", "-O2", "-DCARAFE_TRACE", "-shared", "-fPIC", "-I", str(REPO / "cuda"),
           str(REPO / "tests" / "cuda_host_harness.cpp"), "-o", str(library)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"building the trace harness failed:\n{result.stderr}")
    return ctypes.CDLL(str(library))


# The device the channel slicing of the fixed-k forward pass is planned for (it only affects the forward's mask
# re-reads): an H100 / H200 SXM has 132 SMs.
REFERENCE_SMS = 132


def traffic_plans(shape: tuple[int, int, int, int], dtype: torch.dtype, layout: str = "nchw") -> list[dict]:
    """What each kernel must move and how the loader launches it at ``shape`` (k = KERNEL_SIZE, sigma = SCALE, up),
    NCHW or channels_last (every tensor channels_last, masks included)."""
    n, c, h, w = shape
    out_h, out_w = h * SCALE, w * SCALE
    geometry = (n, c, h, w, out_h, out_w, KERNEL_SIZE, 1, SCALE, 1)
    size = torch.empty((), dtype=dtype).element_size()
    x, m, out = n * c * h * w, n * KERNEL_SIZE ** 2 * out_h * out_w, n * c * out_h * out_w
    plans = []
    for kernel, (a, b, o) in {"forward": (x, m, out), "backward_features": (out, m, x),
                              "backward_masks": (out, x, m)}.items():
        if layout == "nhwc":
            name, full, _ = cuda_backend.launch_plan(kernel, geometry, dtype,
                                                     REFERENCE_SMS * cuda_backend.THREADS_PER_SM, "nhwc", True)
        elif hasattr(cuda_backend, "launch_plan"):
            name, full, _ = cuda_backend.launch_plan(kernel, geometry, dtype,
                                                     REFERENCE_SMS * cuda_backend.THREADS_PER_SM)
        else:  # the kernels before issue 28: one variant per dtype, ten geometry arguments
            name, full = f"{kernel}_{cuda_backend.SUFFIXES[dtype]}", geometry
        plans.append(dict(kernel=kernel, layout=layout, name=name, geometry=full, elements=(a, b, o), size=size,
                          minimum=size * (a + b + o)))
    return plans


def measure_traffic(lib: ctypes.CDLL, plan: dict, dtype: torch.dtype) -> dict:
    fn = getattr(lib, f"host_traffic_{plan['name']}")
    # The traced code computes addresses only; the buffers give it real, disjoint address ranges (never touched).
    buffers = [torch.empty(e, dtype=dtype) for e in plan["elements"]]
    result = (ctypes.c_longlong * 3)()
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * (len(plan["geometry"]) + 2) + [ctypes.c_void_p]
    fn(*(t.data_ptr() for t in buffers), *plan["geometry"], cuda_backend.THREADS_PER_BLOCK, TRAFFIC_SAMPLES,
       ctypes.addressof(result))
    moved = 32 * (result[0] + result[1])
    return dict(kernel=plan["kernel"], layout=plan["layout"], name=plan["name"], dtype=cuda_backend.SUFFIXES[dtype],
                shape=list(plan["geometry"][:4]), minimum=plan["minimum"], read_bytes=32 * result[0],
                write_bytes=32 * result[1], moved=moved, ratio=moved / plan["minimum"], blocks=result[2])


# --- report ----------------------------------------------------------------------------------------------------------

def collect(jobs: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    source = cuda_backend.kernel_source()
    per_dtype = "CARAFE_ONLY_INDEX" in source  # the per-variant kernels compile one dtype at a time (in parallel)
    suffixes = list(cuda_backend.SUFFIXES.values()) if per_dtype else [None]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "carafe_kernels.cu").write_text(source)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            parts = list(pool.map(lambda job: compile_kernels(job[0], source, workdir, job[1]),
                                  [(arch, suffix) for arch in ARCHES for suffix in suffixes]))
        kernels = [k for part in parts for k in part]
        lib = build_trace_harness(workdir)
        traffic = [measure_traffic(lib, plan, dtype) for dtype in TRAFFIC_DTYPES for shape in SHAPES
                   for layout in LAYOUTS for plan in traffic_plans(shape, dtype, layout)]
    rows = []
    for k in kernels:
        row = asdict(k)
        hot = k.hot_loop
        row["hot_loop"] = None if hot is None else dict(asdict(hot), per_fma=hot.per_fma)
        rows.append(row)
    rows.sort(key=lambda r: (r["arch"], r["name"]))
    return dict(compiler=nvcc_version(), commit=_git_commit(), threads_per_block=cuda_backend.THREADS_PER_BLOCK,
                kernels=rows, traffic=traffic, traffic_case=dict(kernel_size=KERNEL_SIZE, scale=SCALE, groups=1),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _git_commit() -> str:
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "cuda"], capture_output=True,
                           text=True).stdout.strip()
    return result.stdout.strip() + (" (cuda/ modified)" if dirty else "")


def _loop_cell(row: dict | None) -> str:
    """Instructions per FMA of every innermost FMA loop (e.g. the interior and the border path), then the counts of
    the hot (worst) one."""
    if row is None or row.get("hot_loop") is None:
        return "–"
    h = row["hot_loop"]
    each = " / ".join(f"{lp['instructions'] / lp['fmas']:.2f}" for lp in sorted(row["loops"], key=lambda lp: lp["start"]))
    return f"{each} (worst: {h['instructions']} instr, {h['fmas']} FMA, {h['loads']} LD)"


def render(data: dict, before: dict | None) -> str:
    lines = ["# CUDA kernels: static performance report", "",
             "Generated by `python scripts/bench_cuda_static.py` (`make bench-cuda-static`) from the compiled code; "
             "no GPU was used. Registers / spills from `ptxas -v`, inner loops from `cuobjdump -sass`, occupancy "
             "from the documented per-SM limits at the loader's launch configuration, memory traffic from the "
             "kernels' per-thread code run on the host with every access recorded (see the script's docstring for "
             "the model). GPU timings derived from these are estimates until a GPU run confirms them.", "",
             f"- **{'after' if before else 'figures'} (this commit)**: {data['commit']}, {data['compiler']}, {data['date']}, "
             f"{data['threads_per_block']} threads per block"]
    if before:
        lines.append(f"- **before**: {before['commit']}, {before['compiler']}, {before['date']}, "
                     f"{before['threads_per_block']} threads per block")
    lines += ["", "Inner loops = the innermost SASS loops that contain FMAs, in code order (for the fixed-k kernels one "
              "is the interior path, without per-tap tests, and one the border path; for the run-time-k ones the tap "
              "loop): instructions per FMA of each, and the instructions, FMAs and global loads of the worst one "
              "(the figure the targets use). "
              "Occupancy = resident warps / 64 at the launch configuration (what limits it).", ""]
    old = {(r["name"], r["arch"]): r for r in before["kernels"]} if before else {}
    for arch in ARCHES:
        lines += [f"## {arch}", ""]
        cols = ["kernel", "registers", "spill st/ld B", "occupancy", "inner loop instr/FMA"]
        if before:
            cols += ["before: registers", "before: occupancy", "before: inner loop instr/FMA"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in (r for r in data["kernels"] if r["arch"] == arch):
            cells = [f"`{r['name']}`", str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}",
                     f"{100 * r['occupancy']:.1f} % ({r['limiter']})", _loop_cell(r)]
            if before:
                # the before report has no channels_last kernel (channels_last tensors were transposed)
                b = None if "_nhwc_" in r["name"] else \
                    old.get((r["name"], arch)) or old.get((_baseline_name(r["name"]), arch))
                cells += ["–", "–", "–"] if b is None else [
                    str(b["registers"]), f"{100 * b['occupancy']:.1f} %", _loop_cell(b)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    case = data["traffic_case"]
    lines += ["## Memory traffic model", "",
              f"k = {case['kernel_size']}, σ = {case['scale']} (up), one group. *Minimum*: every input element read "
              "once and every output element written once. *Moved*: distinct 32-byte sectors read + written per "
              f"thread block (sampled: {TRAFFIC_SAMPLES} blocks spread over the grid, scaled to the grid).", ""]
    cols = ["kernel", "layout", "dtype", "shape (N, C, H, W)", "minimum MB", "moved MB", "moved / minimum"]
    if before:
        cols += ["before: moved MB", "before: moved / minimum"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    old_traffic = {(t["kernel"], t["dtype"], tuple(t["shape"])): t for t in before["traffic"]} if before else {}
    for t in data["traffic"]:
        layout = t.get("layout", "nchw")
        cells = [t["kernel"], layout, t["dtype"], str(tuple(t["shape"])), f"{t['minimum'] / 1e6:.1f}",
                 f"{t['moved'] / 1e6:.1f}", f"{t['ratio']:.2f}x"]
        if before:
            b = old_traffic.get((t["kernel"], t["dtype"], tuple(t["shape"]))) if layout == "nchw" else None
            cells += ["–", "–"] if b is None else [f"{b['moved'] / 1e6:.1f}", f"{b['ratio']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *targets(data, before), "", *estimates(data, before), ""]
    return "\n".join(lines)


# An H100 SXM-class device for the time estimates: SMs, warp instructions issued per SM per cycle (4 schedulers),
# boost clock, DRAM bandwidth.
ESTIMATE_DEVICE = dict(sms=132, issue=4, clock=1.755e9, dram=3.35e12)


def estimates(data: dict, before: dict | None) -> list[str]:
    """Rough forward times at the benchmark shape from the counts above: instruction issue (every FMA of the
    forward executed at its inner loop's instructions per FMA, warps fully populated) and the DRAM floor (the
    minimum bytes at the DRAM bandwidth). Estimates, not measurements."""
    dev = ESTIMATE_DEVICE
    n, c, h, w = SHAPES[0]
    fmas = n * c * (h * SCALE) * (w * SCALE) * KERNEL_SIZE ** 2
    minimum = next(t["minimum"] for t in data["traffic"] if t["kernel"] == "forward" and t["dtype"] == "f32"
                   and t.get("layout", "nchw") == "nchw"
                   and tuple(t["shape"]) == SHAPES[0])
    floor = minimum / dev["dram"]

    def issue_time(d: dict, name: str) -> tuple[float, float]:
        rows = [r for r in d["kernels"] if r["name"] == name and r["arch"] == "sm_90" and r["loops"]]
        per_fma = min(lp["instructions"] / lp["fmas"] for lp in rows[0]["loops"])
        return per_fma, fmas / 32 * per_fma / (dev["sms"] * dev["issue"] * dev["clock"])

    lines = ["## Estimated forward time (not a measurement)", "",
             f"fp32, {SHAPES[0]}, k = {KERNEL_SIZE}, σ = {SCALE} on an H100 SXM-class GPU ({dev['sms']} SMs, "
             f"{dev['issue']} warp instructions per SM per cycle, {dev['clock'] / 1e9:.3f} GHz, "
             f"{dev['dram'] / 1e12:.2f} TB/s DRAM): instruction issue = {fmas / 1e6:.0f} M FMAs / 32 lanes × "
             "instructions per FMA of the kernel's best inner loop (sm_90; the interior path where there are two) / "
             "issue rate; DRAM floor = minimum bytes / DRAM bandwidth. Latency, load-unit throughput, tails and the "
             "border path are ignored, so the real times are longer; a GPU run of `scripts/bench_op.py --device "
             "cuda` replaces these.", "",
             "| kernels | instr / FMA | instruction issue | DRAM floor |", "|---|---|---|---|"]
    now = forward_kernel_for_case(data)
    for label, d, name in (("after", data, now), ("before", before, "carafe_forward_f32")):
        if d is None:
            continue
        per_fma, t = issue_time(d, name)
        lines.append(f"| {label} (`{name}`) | {per_fma:.2f} | {t * 1e6:.0f} µs | {floor * 1e6:.0f} µs |")
    return lines


def _baseline_name(name: str) -> str:
    """The before-report kernel a new variant replaces: carafe_forward_k5_i32_f32 -> carafe_forward_f32."""
    m = re.match(r"(carafe_\w+?)_(?:k\w+_)?(?:i\d+_)?(?:nhwc_)?(f32|f64|f16|bf16)$", name)
    return f"{m.group(1)}_{m.group(2)}" if m else name


def forward_kernel_for_case(data: dict) -> str:
    """The kernel the loader launches for the benchmark's fp32 forward (k = KERNEL_SIZE, NCHW)."""
    names = {r["name"] for r in data["kernels"]}
    chosen = cuda_backend.kernel_name("forward", KERNEL_SIZE, torch.float32, index_bits=32) \
        if hasattr(cuda_backend, "kernel_name") else "carafe_forward_f32"
    return chosen if chosen in names else "carafe_forward_f32"


def targets(data: dict, before: dict | None) -> list[str]:
    """The issue's three targets, checked against the compiled code (and the before report)."""
    def summary(d: dict, forward: str) -> dict:
        fwd = [r for r in d["kernels"] if r["name"] == forward]
        loop = max((r["hot_loop"]["per_fma"] for r in fwd if r["hot_loop"]), default=math.nan)
        occ = min(r["occupancy"] for r in d["kernels"])
        worst = min(d["kernels"], key=lambda r: r["occupancy"])
        spills = sum(r["spill_stores"] + r["spill_loads"] for r in d["kernels"])
        big = [t for t in d["traffic"] if t["kernel"] == "forward" and t["dtype"] == "f32"
               and t.get("layout", "nchw") == "nchw"
               and tuple(t["shape"]) == SHAPES[0]]
        # the kernels the benchmark launches: k = KERNEL_SIZE, 32-bit indices (or the only variant), f32/f16/bf16
        bench = [r for r in d["kernels"] if re.search(rf"_(?:k{KERNEL_SIZE}_i32_)?(?:f32|f16|bf16)$", r["name"])
                 and ("_k" not in r["name"] or f"_k{KERNEL_SIZE}_i32_" in r["name"])]
        bench_occ = min(r["occupancy"] for r in bench)
        bench_spills = sum(r["spill_stores"] + r["spill_loads"] for r in bench)
        # the same for channels_last (the NHWC kernels, when the report has them)
        nhwc = [r for r in d["kernels"] if re.search(rf"_k{KERNEL_SIZE}_i32_nhwc_(?:f32|f16|bf16)$", r["name"])]
        nhwc_forward = forward.replace("_i32_", "_i32_nhwc_")
        nhwc_loop = max((r["hot_loop"]["per_fma"] for r in d["kernels"] if r["name"] == nhwc_forward
                         and r["hot_loop"]), default=math.nan)
        nhwc_big = [t for t in d["traffic"] if t["kernel"] == "forward" and t["dtype"] == "f32"
                    and t.get("layout", "nchw") == "nhwc" and tuple(t["shape"]) == SHAPES[0]]
        return dict(forward=forward, loop=loop, occupancy=occ, worst=f"{worst['name']} on {worst['arch']}",
                    spills=spills, traffic=big[0]["ratio"] if big else math.nan, bench_occupancy=bench_occ,
                    bench_spills=bench_spills, bench_count=len(bench), nhwc_count=len(nhwc),
                    nhwc_occupancy=min((r["occupancy"] for r in nhwc), default=math.nan),
                    nhwc_spills=sum(r["spill_stores"] + r["spill_loads"] for r in nhwc), nhwc_forward=nhwc_forward,
                    nhwc_loop=nhwc_loop, nhwc_traffic=nhwc_big[0]["ratio"] if nhwc_big else math.nan)

    now = summary(data, forward_kernel_for_case(data))
    was = summary(before, "carafe_forward_f32") if before else None

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines = ["## Targets (issue 28)", "",
             f"Benchmark forward: fp32, (2, 256, 128, 128), k = {KERNEL_SIZE}, σ = {SCALE}; kernel `{now['forward']}`.",
             ""]
    rows = [("forward f32 inner loop ≤ 5 SASS instructions per FMA", f"{now['loop']:.2f}",
             was and f"{was['loop']:.2f}", now["loop"] <= 5),
            ("every kernel ≥ 50 % occupancy on sm_80 and sm_90, no spills",
             f"min {100 * now['occupancy']:.1f} % ({now['worst']}), {now['spills']} spill bytes",
             was and f"min {100 * was['occupancy']:.1f} % ({was['worst']}), {was['spills']} spill bytes",
             now["occupancy"] >= 0.5 and now["spills"] == 0),
            (f"the benchmark's kernels (k = {KERNEL_SIZE}, 32-bit indices, f32 / f16 / bf16; "
             f"{now['bench_count']} on 2 architectures) ≥ 50 % occupancy, no spills",
             f"min {100 * now['bench_occupancy']:.1f} %, {now['bench_spills']} spill bytes",
             was and f"min {100 * was['bench_occupancy']:.1f} %, {was['bench_spills']} spill bytes",
             now["bench_occupancy"] >= 0.5 and now["bench_spills"] == 0),
            ("forward L2 traffic ≤ 3x its minimum (traffic model)", f"{now['traffic']:.2f}x",
             was and f"{was['traffic']:.2f}x", now["traffic"] <= 3)]
    if now["nhwc_count"]:  # channels_last: the same targets for the NHWC kernels (the before report had none)
        rows += [(f"channels_last forward (`{now['nhwc_forward']}`) f32 inner loop ≤ 5 SASS instructions per FMA",
                  f"{now['nhwc_loop']:.2f}", None, now["nhwc_loop"] <= 5),
                 (f"the channels_last benchmark kernels (k = {KERNEL_SIZE}, 32-bit indices, f32 / f16 / bf16; "
                  f"{now['nhwc_count']} on 2 architectures) ≥ 50 % occupancy, no spills",
                  f"min {100 * now['nhwc_occupancy']:.1f} %, {now['nhwc_spills']} spill bytes", None,
                  now["nhwc_occupancy"] >= 0.5 and now["nhwc_spills"] == 0),
                 ("channels_last forward L2 traffic ≤ 3x its minimum (traffic model)", f"{now['nhwc_traffic']:.2f}x",
                  None, now["nhwc_traffic"] <= 3)]
    lines += ["| target | after | before | verdict |", "|---|---|---|---|"]
    for name, after, old, ok in rows:
        lines.append(f"| {name} | {after} | {old or '–'} | {verdict(ok)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "cuda-static.md")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the figures as JSON (default: --out with .json)")
    parser.add_argument("--before", type=Path, default=None,
                        help="a JSON written by this script at an earlier commit, shown as the 'before' columns")
    parser.add_argument("--jobs", type=int, default=2, help="nvcc processes at a time (default 2)")
    args = parser.parse_args()
    data = collect(args.jobs)
    before = json.loads(args.before.read_text()) if args.before else None
    json_path = args.json or args.out.with_suffix(".json")
    write_text_atomic(json_path, json.dumps(data, indent=1) + "\n")
    write_text_atomic(args.out, render(data, before))
    print(render(data, before).split("## Targets", 1)[-1])
    print(f"wrote {args.out} and {json_path}")


if __name__ == "__main__":
    main()
