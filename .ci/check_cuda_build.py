"""CI check of a CUDA build of widetopo_ext (runs without a GPU).

Asserts, from three independent sources, that the installed extension was built with CUDA:
  1. build_info(): with_cuda, a CUDA (and CPU) kernel for each op of widetopo_ext.OPS, the archs;
  2. the torch dispatcher itself: a CUDA kernel registered for every widetopo::<op>;
  3. the library file: its .nv_fatbin section embeds SASS for each requested architecture.
Exits 1 listing every problem found.

    python .ci/check_cuda_build.py --archs "8.0;9.0"
"""
import argparse
import os
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
FATBIN_KIND_PTX, FATBIN_KIND_ELF = 1, 2


def _elf_section(path, wanted):
    """Bytes of the section named `wanted` of a 64-bit little-endian ELF file, or None."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = header(shstrndx)
    for i in range(shnum):
        name, offset, size = header(i)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name:end].decode() == wanted:
            return data[offset:offset + size]
    return None


def fatbin_archs(path):
    """{"sass": {80, 90, ...}, "ptx": {...}}: the code objects embedded in the library.

    The .nv_fatbin section is a sequence of fat binaries (header: magic, version, header size,
    payload size), each a sequence of entries (kind 1 = PTX, 2 = ELF/SASS; the entry header
    holds its own size, the payload size, and at byte 28 the sm number).
    """
    section = _elf_section(path, ".nv_fatbin")
    found = {"sass": set(), "ptx": set()}
    if section is None:
        return found
    pos = 0
    while pos + 16 <= len(section):
        magic, _version, hsize, fat_size = struct.unpack_from("<IHHQ", section, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned; skip padding
            continue
        entry, end = pos + hsize, pos + hsize + fat_size
        while entry + 32 <= end:
            kind, _ver, ehsize, payload = struct.unpack_from("<HHIQ", section, entry)
            arch = struct.unpack_from("<I", section, entry + 28)[0]
            if kind == FATBIN_KIND_ELF:
                found["sass"].add(arch)
            elif kind == FATBIN_KIND_PTX:
                found["ptx"].add(arch)
            if ehsize == 0:
                break
            entry += ehsize + payload
        pos = end
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="8.0;9.0",
                        help="architectures that must have been compiled, ';'-separated")
    args = parser.parse_args(argv)
    required = [a.strip() for a in args.archs.split(";") if a.strip()]

    import torch
    import widetopo_ext
    from widetopo_ext import _C

    # The ops the Python side declares (widetopo_ext.OPS), not the library's own build_info list.
    expected_ops = widetopo_ext.OPS

    problems = []
    print("torch", torch.__version__, "CUDA", torch.version.cuda)
    print("widetopo_ext", os.path.realpath(widetopo_ext.__file__))
    print("_C", os.path.realpath(_C.__file__))
    if torch.version.cuda is None:
        problems.append("torch has no CUDA: run this with the CUDA torch")

    info = _C.build_info()
    for key in ("ops", "cpu_kernels", "cuda_kernels", "with_cuda", "cuda_archs"):
        print(f"  build_info[{key!r}] = {info.get(key)!r}")
    if sorted(info.get("ops", [])) != sorted(expected_ops):
        problems.append(f"build_info ops {info.get('ops')} != expected {list(expected_ops)}")
    if info.get("with_cuda") is not True:
        problems.append("build_info()['with_cuda'] is not True")
    for backend in ("cpu_kernels", "cuda_kernels"):
        missing = [op for op in expected_ops if info.get(backend, {}).get(op) is not True]
        if missing:
            problems.append(f"no {backend.split('_')[0].upper()} kernel (build_info) for: {missing}")

    for key in ("CPU", "CUDA"):
        missing = [op for op in expected_ops
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"widetopo::{op}", key)]
        if missing:
            problems.append(f"dispatcher has no {key} kernel for: {missing}")

    reported = {a.replace("+PTX", "").strip() for a in str(info.get("cuda_archs", "")).split(";")}
    for arch in required:
        if arch not in reported:
            problems.append(f"build_info cuda_archs {info.get('cuda_archs')!r} lacks {arch}")

    embedded = fatbin_archs(os.path.realpath(_C.__file__))
    print("  embedded SASS:", sorted(embedded["sass"]), "PTX:", sorted(embedded["ptx"]))
    for arch in required:
        sm = int(arch.replace(".", ""))
        if sm not in embedded["sass"]:
            problems.append(f"the library embeds no sm_{sm} code (SASS) in .nv_fatbin")

    if problems:
        print("CUDA build check FAILED:")
        for p in problems:
            print("  -", p)
        return 1
    print(f"CUDA build check passed: {len(expected_ops)} ops with CPU and CUDA kernels, "
          f"SASS for {', '.join(required)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
