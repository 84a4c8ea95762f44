"""ptxas report and SASS instruction counts of the cluster kernels (no GPU needed).

Compiles csrc/cuda/lstm_cluster_cuda.cu for sm_90 with setup.py's flags plus `-Xptxas -v`, disassembles
it with the cuobjdump shipped in the triton wheel, and prints one line per kernel variant: registers,
stack and spills (ptxas), and the counts of the instructions the design depends on (SASS): the
tensor-core HMMA, local-memory LDL/STL (spills), the cluster barrier's UCGABAR arrive/wait, shared
loads (LDS.128: packed W fragments; LDS: h / dG fragments), DSMEM stores (generic ST.E*: 16-byte
pieces are ST.E.128).

    python benchmarks/sass_report.py > benchmarks/results/ptxas-cluster-sm_90-<date>.txt
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "lstm_cluster_cuda.cu"


def nvcc_command(out: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    site = Path(torch.__file__).resolve().parents[1]
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    includes = [f"-I{ROOT / 'csrc'}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    includes += [f"-I{cuda_home / 'include'}", f"-I{sysconfig.get_paths()['include']}",
                 "-isystem", str(site / "nvidia" / "cu13" / "include")]
    return [str(cuda_home / "bin" / "nvcc"), *includes, "-c", str(SOURCE), "-o", str(out),
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "--compiler-options", "-fPIC", "-O3",
            "-lineinfo", "-DFASTLSTM_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            "-gencode=arch=compute_90,code=sm_90", "-std=c++20", "-Xptxas", "-v"]


def cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def readable(mangled: str) -> str:
    """cluster_forward_kernel<c10::BFloat16, float, R, cells> from the mangled name."""
    m = re.search(r"cluster_(forward|backward)_kernel(I.*?)fLi(\d+)ELi(\d+)E", mangled)
    if not m:
        return mangled
    dtype = {"If": "float", "IN3c104HalfE": "c10::Half", "IN3c108BFloat16E": "c10::BFloat16"}.get(m.group(2), m.group(2))
    return f"cluster_{m.group(1)}_kernel<{dtype}, R={m.group(3)} register tiles, {m.group(4)} cells>"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "cluster.o"
        build = subprocess.run(nvcc_command(obj), capture_output=True, text=True)
        if build.returncode != 0:
            sys.exit(build.stderr)
        sass = subprocess.run([cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    ptxas: dict[str, str] = {}
    current = None
    for line in build.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = m.group(1)
            ptxas[current] = ""
        elif current and ("stack frame" in line or "Used" in line):
            ptxas[current] += re.sub(r"^ptxas info\s*:\s*", "", line.strip()) + "; "
    counts: dict[str, Counter] = {}
    current = None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\w+)", line):
            current = m.group(1)
            counts[current] = Counter()
        elif current and (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)):
            op = m.group(1)
            for key in ("HMMA", "LDL", "STL", "UCGABAR_ARV", "UCGABAR_WAIT", "BAR.SYNC", "SHFL"):
                if op.startswith(key):
                    counts[current][key] += 1
            if op in ("LDS.128", "LDS", "LDS.64", "ST.E.U16", "ST.E", "ST.E.64", "ST.E.128"):
                counts[current][op] += 1
            if op.startswith("HMMA"):
                counts[current]["hmma_kind:" + op] += 1
    print(f"# ptxas report and SASS counts, {SOURCE.relative_to(ROOT)}, sm_90, "
          f"{datetime.date.today().isoformat()}, by benchmarks/sass_report.py (nvcc with setup.py's flags + -Xptxas -v;"
          f" triton's cuobjdump -sass); counts over the whole kernel")
    print("# kernel | ptxas | SASS")
    for name in sorted(ptxas, key=readable):
        c = counts.get(name, Counter())
        kinds = ",".join(sorted(k.split(":", 1)[1] for k in c if k.startswith("hmma_kind:")))
        sass_part = (f"HMMA x{c['HMMA']} ({kinds}), LDL/STL {c['LDL'] + c['STL']}, "
                     f"UCGABAR_ARV x{c['UCGABAR_ARV']} / UCGABAR_WAIT x{c['UCGABAR_WAIT']}, BAR.SYNC x{c['BAR.SYNC']}, "
                     f"LDS.128 x{c['LDS.128']} LDS x{c['LDS']} LDS.64 x{c['LDS.64']}, ST.E.U16 x{c['ST.E.U16']} "
                     f"ST.E x{c['ST.E']} ST.E.64 x{c['ST.E.64']} ST.E.128 x{c['ST.E.128']}, SHFL x{c['SHFL']}")
        print(f"{readable(name)} | {ptxas[name].strip('; ')} | {sass_part}")


if __name__ == "__main__":
    main()
