"""The pieces of the CUDA static report (reproduction/cuda_static.py) and of the GPU benchmark's plan that run
without a GPU or a compiler: occupancy from the per-SM limits, the SASS loop finder, and bench_op's --dry-run."""

from __future__ import annotations

from pathlib import Path

import pytest

import reproduction.cuda_static as static

REPO = Path(__file__).resolve().parents[1]


# Occupancy of 256-thread blocks by registers per thread, as the CUDA occupancy calculator gives it for compute
# capability 8.0 / 9.0 (64 warps, 65536 registers allocated per warp in units of 256, 32 blocks per SM).
@pytest.mark.parametrize("registers,expected", [(32, 1.0), (40, 0.75), (64, 0.5), (65, 0.375), (74, 0.375),
                                                (80, 0.375), (96, 0.25), (128, 0.25), (255, 0.125)])
@pytest.mark.parametrize("arch", static.ARCHES)
def test_occupancy_by_registers(arch, registers, expected):
    blocks, occupancy, limiter = static.occupancy(arch, registers, 256, 0)
    assert occupancy == expected
    assert limiter == ("registers" if expected < 1 else "warps")


def test_occupancy_by_shared_memory():
    # 48 KiB per block (+1 KiB reserved): 3 blocks on sm_80 (164 KiB), 4 on sm_90 (228 KiB).
    assert static.occupancy("sm_80", 32, 256, 48 * 1024)[:1] == (3,)
    assert static.occupancy("sm_90", 32, 256, 48 * 1024)[:1] == (4,)


SASS = """
        Function : toy
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/                   HFMA2.MMA R5, -RZ, RZ, 0, 0 ;
        /*0040*/                   IADD3 R4, R4, 0x4, RZ ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0070*/                   FFMA R3, R2, R2, R3 ;
        /*0080*/                   FFMA R3, R2, R2, R3 ;
        /*0090*/               @P1 BRA 0x60 ;
        /*00a0*/               @P2 BRA 0x0 ;
        /*00b0*/                   EXIT ;
"""


def test_inner_loops_of_sass():
    """Two innermost loops (the outer one that contains them is not innermost); HFMA2.MMA is a move, not an FMA."""
    functions = static.parse_sass(SASS)
    loops = static.inner_loops(functions["toy"])
    assert [(lp.start, lp.end, lp.instructions, lp.fmas, lp.loads) for lp in loops] == [
        (0x10, 0x50, 5, 1, 1), (0x60, 0x90, 4, 2, 1)]


def test_bench_op_cuda_dry_run(capsys):
    """The GPU benchmark's plan parses and builds on a machine without a GPU: both shapes, both directions, three
    dtypes, and the reassembly paths it compares."""
    from reproduction import op_benchmark

    op_benchmark.main(["--device", "cuda", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 2 * 3
    for label in ("up (2, 256, 128, 128) ", "down (2, 256, 64, 64) float16", "up (2, 256, 64, 64) bfloat16"):
        assert any(line.startswith(label) for line in lines), label
    assert all("reference, fast, naive unfold" in line for line in lines)
    assert "forward moves 180.9 MB" in lines[0]  # 4 bytes x (features + masks + output) at (2, 256, 128, 128)
