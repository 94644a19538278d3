# Where a compiled kernel's register spills sit. ptxas -v counts spill bytes; what they cost depends
# on where the spill stores and loads (SASS STL / LDL: local memory) run: outside every loop (the
# prologue, the epilogue: once a program) or inside a loop (a K loop: every step). The cubin is
# disassembled with the nvdisasm that Triton ships (`--print-line-info`: each instruction's source
# line); a loop is the address range [target, branch] of a backward branch, so loops nest as the
# ranges do, and each local-memory instruction is placed in the loops whose ranges hold it. Works for
# Triton cubins (`compiled.asm["cubin"]`) and for the CUDA extension's (cuobjdump -xelf extracts them).
"""Where a kernel's register spills sit: outside loops or inside (and which loop, by source line).

``python -m lora_ensemble.kernels.spill_sites [FILE...]`` reads cubins, or shared libraries with
embedded cubins (by default the installed CUDA extension, ``lora_ensemble._C``), and prints every
kernel with local-memory instructions: how many sit outside loops and how many in each loop nest (the
loops' source lines, outermost first). Needs Triton's NVIDIA tools (nvdisasm, cuobjdump), not a GPU.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["OUTSIDE_LOOPS", "KernelSpills", "LocalAccess", "cubin_spill_sites", "extension_path",
           "library_spill_sites", "main", "parse_sass"]

OUTSIDE_LOOPS = "outside loops"
_FUNCTION = re.compile(r"^//-+ \.text\.(\S+) -+")
_SOURCE_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"\((\.L_x_\d+)\)")


@dataclass(frozen=True)
class LocalAccess:
    """One local-memory instruction: its address, opcode (``STL``, ``LDL.LU``, ...), source line
    (``file:line``) and the loops around it (the source line of each loop's backward branch,
    outermost first; empty outside loops)."""

    address: int
    opcode: str
    source: str
    loops: tuple[str, ...]


@dataclass(frozen=True)
class KernelSpills:
    """The local-memory instructions of one kernel (``accesses``) and its loops (the source line of
    each loop's backward branch; by first address, outer loops first)."""

    kernel: str
    accesses: tuple[LocalAccess, ...]
    loops: tuple[str, ...]

    def by_loop(self) -> dict[tuple[str, ...], int]:
        """Local-memory instructions per loop nest (outermost loop first), those outside loops under ()."""
        return dict(Counter(a.loops for a in self.accesses))

    def places(self) -> tuple[tuple[str, int], ...]:
        """:meth:`by_loop` named: ``OUTSIDE_LOOPS``, or a nest's loops joined by ``" > "``."""
        return tuple((" > ".join(nest) if nest else OUTSIDE_LOOPS, count)
                     for nest, count in sorted(self.by_loop().items()))


def parse_sass(text: str) -> dict[str, KernelSpills]:
    """The kernels of ``nvdisasm --print-line-info`` output (mangled names) with their local-memory
    instructions and loops."""
    kernels: dict[str, list[tuple[int, str, str, str]]] = {}
    labels: dict[str, int] = {}
    pending: list[str] = []
    current, source = None, "?"
    for line in text.splitlines():
        if match := _FUNCTION.match(line):
            current, source = match.group(1), "?"
            kernels[current] = []
            continue
        if match := _SOURCE_LINE.search(line):
            source = f"{os.path.basename(match.group(1))}:{match.group(2)}"
            continue
        if match := _LABEL.match(line):
            pending.append(match.group(1))
            continue
        if current is not None and (match := _INSTRUCTION.match(line)):
            address = int(match.group(1), 16)
            for label in pending:
                labels[label] = address
            pending = []
            kernels[current].append((address, match.group(2), match.group(3), source))
    result = {}
    for name, instructions in kernels.items():
        loops = []  # (first, last, source line of the backward branch)
        for address, opcode, operands, where in instructions:
            target = _BRANCH_TARGET.search(operands)
            # (a branch to itself is the trap after EXIT, no loop)
            if opcode.startswith("BRA") and target and labels.get(target.group(1), address) < address:
                loops.append((labels[target.group(1)], address, where))
        loops.sort(key=lambda loop: (loop[0], -loop[1]))  # outer loops first
        accesses = tuple(
            LocalAccess(address, opcode, where,
                        tuple(line for first, last, line in loops if first <= address <= last))
            for address, opcode, _, where in instructions if opcode.startswith(("STL", "LDL")))
        result[name] = KernelSpills(name, accesses, tuple(line for _, _, line in loops))
    return result


def _tool(name: str) -> str:
    """The path of one of Triton's bundled NVIDIA tools (``nvdisasm``, ``cuobjdump``)."""
    import triton

    path = getattr(triton.knobs.nvidia, name).path
    if not path or not os.path.exists(path):
        raise RuntimeError(f"spill_sites: Triton's {name} was not found (triton {triton.__version__})")
    return path


def cubin_spill_sites(cubin: bytes) -> dict[str, KernelSpills]:
    """Disassemble one cubin (with its line information) and place its kernels' local-memory
    instructions (:func:`parse_sass`)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        done = subprocess.run([_tool("nvdisasm"), "--print-line-info", "--print-code", path],
                              capture_output=True, text=True, check=True)
    return parse_sass(done.stdout)


def library_spill_sites(path: str, cubin: str = "all") -> dict[str, dict[str, KernelSpills]]:
    """Per embedded cubin (``lora_kernels_bf16.sm_90.cubin``, ...), the spill sites of its kernels,
    from a shared library or fat binary (``cuobjdump -xelf``; ``cubin``: one embedded cubin's name,
    or "all")."""
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([_tool("cuobjdump"), "-xelf", cubin, os.path.abspath(path)], cwd=folder,
                       capture_output=True, check=True)
        paths = sorted(glob.glob(os.path.join(folder, "*.cubin")))

        def sites(path: str) -> dict[str, KernelSpills]:
            with open(path, "rb") as file:
                return cubin_spill_sites(file.read())

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # each disassembly is a process of its own
            return {os.path.basename(path): found for path, found in zip(paths, pool.map(sites, paths))}


def extension_path() -> str | None:
    """The file of the installed CUDA extension ``lora_ensemble._C`` (found, not loaded: its cubins
    can be read where its torch ABI does not load), or None."""
    spec = importlib.util.find_spec("lora_ensemble._C")
    return spec.origin if spec is not None and spec.origin else None


def _demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    lines = done.stdout.splitlines()
    return lines if done.returncode == 0 and len(lines) == len(names) else names


def _format_spills(kernels: dict[str, KernelSpills]) -> list[str]:
    """One line per kernel with local-memory instructions: how many outside loops and per loop nest."""
    spilling = [k for k in kernels.values() if k.accesses]
    lines = []
    for kernel, name in zip(spilling, _demangle([k.kernel for k in spilling])):
        places = ", ".join(f"{count} {place}" if place == OUTSIDE_LOOPS else f"{count} in loop {place}"
                           for place, count in kernel.places())
        lines.append(f"{name}: {places}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_ensemble.kernels.spill_sites", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*",
                        help="cubins, or shared libraries with embedded cubins (default: lora_ensemble._C)")
    args = parser.parse_args(argv)
    if not args.files:
        extension = extension_path()
        if extension is None:
            parser.error("no CUDA extension (lora_ensemble._C) installed: name cubins or shared libraries")
        args.files = [extension]
    for path in args.files:
        if path.endswith(".cubin"):
            with open(path, "rb") as file:
                found = {os.path.basename(path): cubin_spill_sites(file.read())}
        else:
            found = library_spill_sites(path)
        for cubin, kernels in found.items():
            lines = _format_spills(kernels)
            print(f"{cubin}: {len(kernels)} kernels, {len(lines)} with local-memory instructions")
            for line in lines:
                print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
