"""Compile a Triton kernel for a GPU offline (no GPU needed: triton ships ptxas / nvdisasm) and
print its registers a thread (with the warps: programs an SM holds, so waves a grid takes) and
the instruction mix of each loop in its SASS: what a K loop costs per weight element, whether
loads are vectorized or pipelined (LDGSTS), whether tensor-core instructions (HGMMA / QGMMA /
HMMA) appear, and whether registers spill (LDL / STL).

    python scripts/kernel_sass.py polymodal.llm_core.layers.int4_gemv._int4_gemv_kernel \
        --const HAS_BIAS=0 HAS_PERM=0 SPLIT_K=8 BLOCK_M=1 BLOCK_N=64 BLOCK_K=128 \
                GROUP_TILES=1 USE_PDL=1 \
        --type x_ptr=*bf16 s_ptr=*bf16 b_ptr=*bf16 out_ptr=*bf16 z_ptr=*u8 part_ptr=*fp32

Arguments not named default to `*i32` (names ending in `_ptr`) or `i32`; pointers, `N`, `K`,
`stride*` and the names after `--aligned` are declared 16-divisible, as Triton specializes them
at real launches.
Divide a loop's count by the elements one thread handles per iteration (tile / threads).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import sys


def loop_mix(sass: str) -> list[tuple[str, int, collections.Counter, int]]:
    """(label, instructions, opcode counts, spills) of each backward-branch loop."""
    lines = sass.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\w+:$", line)}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA (\w+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = [x.split("\t")[-1].strip() for x in lines[labels[m.group(1)] + 1 : i + 1]]
            body = [x for x in body if x]
            ops = [re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body]
            spills = sum(1 for x in body if re.search(r"\b(LDL|STL)\b", x))
            loops.append((m.group(1), len(body), collections.Counter(ops), spills))
    return loops


def largest_loop(
    kernel: str, const: dict, types: dict, warps: int = 4, using: tuple[str, ...] = ()
) -> tuple[int, int, dict]:
    """(instructions, spill accesses, opcode counts) of the kernel's largest loop (of those with
    any of the opcodes `using`, if given), compiled by this script in a subprocess (so that a
    test's TRITON_INTERPRET does not apply)."""
    loops = compiled(kernel, const, types, warps)[1]
    return max(loop for loop in loops if not using or any(op in loop[2] for op in using))


def compiled(kernel: str, const: dict, types: dict, warps: int = 4) -> tuple[int, list]:
    """(registers a thread, [(instructions, spill accesses, opcode counts) of each loop]) of
    the kernel compiled by this script in a subprocess."""
    import subprocess

    args = [sys.executable, __file__, kernel, "--warps", str(warps), "--top", "1000"]
    args += ["--const", *(f"{k}={v}" for k, v in const.items())]
    args += ["--type", *(f"{k}={v}" for k, v in types.items())]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-4000:])
    loops = []
    for line in done.stdout.splitlines():
        m = re.match(r"loop \w+: (\d+) instructions, (\d+) spill accesses: (.*)", line)
        if m:
            ops = dict(x.rsplit(" ", 1) for x in m.group(3).split(", "))
            loops.append((int(m.group(1)), int(m.group(2)), {k: int(v) for k, v in ops.items()}))
    return int(re.search(r"(\d+) registers a thread", done.stdout).group(1)), loops


def registers(cubin: bytes) -> int:
    """Registers a thread of the compiled kernel (`cuobjdump`, shipped with triton): with the
    warps, how many programs an SM holds (65536 registers an SM)."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    return int(re.search(r"REG:(\d+)", usage).group(1))


def main() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel", help="module.path.kernel_name")
    parser.add_argument(
        "--const", nargs="*", default=[], help="NAME=int | True | text (constexprs)"
    )
    parser.add_argument("--type", nargs="*", default=[], help="NAME=*bf16 | *u8 | fp32 | ...")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--top", type=int, default=16)
    parser.add_argument("--aligned", nargs="*", default=[],
                        help="more int arguments a real launch sees 16-divisible")  # fmt: skip
    args = parser.parse_args()
    module, name = args.kernel.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    words = {"True": True, "False": False}
    const = {
        k: int(v) if v.lstrip("-").isdigit() else words.get(v, v)
        for k, v in (c.split("=") for c in args.const)
    }
    unknown = [k for k in const if k not in fn.arg_names]
    if unknown:  # one command line for two versions of a kernel (before / after a change)
        print(f"{name} takes no {', '.join(unknown)}: ignored", file=sys.stderr)
        const = {k: v for k, v in const.items() if k in fn.arg_names}
    for param in fn.params:  # a constexpr with a default, not named: its default
        if param.is_constexpr and param.has_default and param.name not in const:
            const[param.name] = param.default
    given = dict(t.split("=") for t in args.type)
    types = {
        n: "constexpr" if n in const else given.get(n, "*i32" if n.endswith("_ptr") else "i32")
        for n in fn.arg_names
    }
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if n not in const
        and (n.endswith("_ptr") or n in ("N", "K", *args.aligned) or n.startswith("stride"))
    }
    kernel = triton.compile(
        ASTSource(fn, types, const, aligned),
        target=GPUTarget("cuda", args.arch, 32),
        options={"num_warps": args.warps, "num_stages": args.stages},
    )
    print(f"{name} sm_{args.arch}: shared memory {kernel.metadata.shared} bytes, "
          f"{registers(kernel.asm['cubin'])} registers a thread")  # fmt: skip
    for label, count, ops, spills in loop_mix(kernel.asm["sass"]):
        mix = ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top))
        print(f"loop {label}: {count} instructions, {spills} spill accesses: {mix}")


if __name__ == "__main__":
    main()
