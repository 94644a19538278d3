"""Where a compiled kernel's register spills sit (``lora_ensemble.kernels.spill_sites``): each
local-memory instruction of the disassembly placed outside loops or in the loops around it.

The parser is checked on a hand-written disassembly; on real cubins, compiled without a GPU: a
Triton kernel's loops are its source's ``for`` statements (the K loop among them), the spills of a
kernel the spill record lists sit outside loops or in one of those loops, and the CUDA extension's
fused kernels (where built) keep every spill out of their K loops, where it would run every step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from lora_ensemble.kernels import spill_sites  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

SASS = """
//--------------------- .text.kernel_a --------------------------
        .section        .text.kernel_a,"ax",@progbits
kernel_a:
        //## File "/src/k.py", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
.L_x_0:
        //## File "/src/k.py", line 20
        /*0020*/                   LDS R4, [R3] ;
.L_x_1:
        //## File "/src/k.py", line 21
        /*0030*/              @!P0 LDL.LU R5, [R1] ;
        /*0040*/               @P1 BRA `(.L_x_1) ;
        /*0050*/                   STL.64 [R1+0x8], R6 ;
        /*0060*/              @!P2 BRA `(.L_x_2) ;
        //## File "/src/k.py", line 20
        /*0070*/                   BRA `(.L_x_0) ;
.L_x_2:
        //## File "/src/k.py", line 30
        /*0080*/                   LDL.64 R6, [R1+0x8] ;
        /*0090*/                   EXIT ;
.L_x_3:
        /*00a0*/                   BRA `(.L_x_3) ;
//--------------------- .text.kernel_b --------------------------
kernel_b:
        /*0000*/                   EXIT ;
"""


def test_local_memory_instructions_are_placed_in_their_loops():
    """Loops are backward branches (nested as their ranges; a forward branch is none, nor the branch
    to itself after EXIT); a predicated LDL counts; the epilogue's load after the loops is outside them."""
    kernels = spill_sites.parse_sass(SASS)
    a, b = kernels["kernel_a"], kernels["kernel_b"]
    assert a.loops == ("k.py:20", "k.py:21") and b.loops == () and not b.accesses
    placed = [(x.opcode, x.source, x.loops) for x in a.accesses]
    assert placed == [("STL", "k.py:10", ()), ("LDL.LU", "k.py:21", ("k.py:20", "k.py:21")),
                      ("STL.64", "k.py:21", ("k.py:20",)), ("LDL.64", "k.py:30", ())]
    assert a.by_loop() == {(): 2, ("k.py:20", "k.py:21"): 1, ("k.py:20",): 1}


def _for_lines(path: Path) -> set[str]:
    return {f"{path.name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if re.match(r"\s*for\b", line)}


def _without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# A kernel the spill record lists (it spills 484-488 bytes under triton 3.6 and 3.8): a column
# group of 2 x 64 at rank tile 128, 64-row member tiles.
SPILLING_CASE = "forward-fp16-R128-M64m-S1-aligned BLOCK_N=64 BLOCK_K=64 GROUP_M=8 COL_TILES=2 w4 s4"
# A gate case compiled clean under both versions (column groups at 64-row tiles of 4 rank slots).
CLEAN_CASE = "forward-bf16-R16-M64-S4-aligned BLOCK_N=128 BLOCK_K=64 GROUP_M=8 COL_TILES=2 w8 s3"


@pytest.fixture(scope="module")
def triton_cubins(tmp_path_factory):
    """The AOT report of SPILLING_CASE on sm_90 and the cubin of one clean gate case."""
    folder = tmp_path_factory.mktemp("spills")
    report, cubin = folder / "report.json", folder / "clean.cubin"
    subprocess.run([sys.executable, "-m", "lora_ensemble.kernels.aot", "--arch", "90", "--all-candidates",
                    "--only", SPILLING_CASE, "--json", str(report)], env=_without_interpreter(),
                   capture_output=True, timeout=300)
    script = (
        "import sys, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from lora_ensemble.kernels import aot\n"
        f"case = next(c for c in aot.aot_cases(90) if f'{{c.label()}} {{c.config_text()}}' == {CLEAN_CASE!r})\n"
        "compiled = triton.compile(aot._source(case), target=GPUTarget('cuda', 90, 32),\n"
        "    options={'num_warps': case.config.num_warps, 'num_stages': case.config.num_stages})\n"
        "open(sys.argv[1], 'wb').write(compiled.asm['cubin'])\n")
    subprocess.run([sys.executable, "-c", script, str(cubin)], env=_without_interpreter(), check=True,
                   capture_output=True, timeout=300)
    (spilling,) = json.loads(report.read_text())["reports"]
    return spilling, cubin.read_bytes()


def test_a_triton_kernels_loops_are_its_for_statements(triton_cubins):
    _, cubin = triton_cubins
    (kernel,) = spill_sites.cubin_spill_sites(cubin).values()
    source = ROOT / "kernels" / "fused_lora_gemm.py"
    lines = source.read_text().splitlines()
    k_loops = {f"{source.name}:{i}" for i, line in enumerate(lines, 1) if "in range(0, INNER, BLOCK_K)" in line}
    assert k_loops & set(kernel.loops) and set(kernel.loops) <= _for_lines(source), kernel.loops
    assert not kernel.accesses  # ptxas reports no spill


def test_the_command_line_reads_cubins(triton_cubins, tmp_path, capsys):
    _, cubin = triton_cubins
    path = tmp_path / "clean.cubin"
    path.write_bytes(cubin)
    assert spill_sites.main([str(path)]) == 0
    assert capsys.readouterr().out == "clean.cubin: 1 kernels, 0 with local-memory instructions\n"


def test_the_aot_report_places_a_spilling_kernels_spills(triton_cubins):
    """Every local-memory instruction of a kernel ptxas says spills is placed outside loops or in
    loops of the kernel's source (nested loops joined by " > ")."""
    report, _ = triton_cubins
    assert report["spill_stores"] and report["spill_sites"], report
    loops = _for_lines(ROOT / "kernels" / "fused_lora_gemm.py")
    for place, count in report["spill_sites"].items():
        assert count > 0 and (place == "outside loops" or set(place.split(" > ")) <= loops), place


def test_no_fused_cuda_kernel_spills_in_its_k_loop():
    """The fused CUDA kernels spill a few words a thread at 64-row tiles and rank tiles >= 32 (ptxas
    -v; benchmarks/NOTES.md): every such instruction sits outside the K loop, which runs once per
    reduction step (its line: the ``for (int kt = 0; kt < k_tiles; ++kt)`` of fused_lora_gemm.cuh);
    and every fused kernel has that loop, so the check is not vacuous."""
    extension = spill_sites.extension_path()
    if extension is None:
        pytest.skip("no CUDA extension (lora_ensemble._C) built")
    found = spill_sites.library_spill_sites(extension)
    source = (ROOT / "csrc" / "cuda" / "fused_lora_gemm.cuh").read_text().splitlines()
    k_loop = next(f"fused_lora_gemm.cuh:{i}" for i, line in enumerate(source, 1)
                  if "for (int kt = 0; kt < k_tiles; ++kt)" in line)
    fused = {cubin: [k for name, k in kernels.items() if "fused_lora_gemm_kernel" in name]
             for cubin, kernels in found.items() if cubin.startswith("lora_kernels_")}
    if not fused:
        pytest.skip("the CUDA extension was built without CUDA kernels")
    assert all(fused.values()), sorted(found)  # every dtype's cubin, for every arch built
    fused = [kernel for kernels in fused.values() for kernel in kernels]
    assert all(k_loop in kernel.loops for kernel in fused), k_loop
    in_k_loop = [(kernel.kernel, a.source) for kernel in fused for a in kernel.accesses if k_loop in a.loops]
    assert not in_k_loop, in_k_loop
