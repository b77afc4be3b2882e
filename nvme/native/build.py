"""Build the native data path: python -m nvme.native.build [--quiet]

cffi API mode: fastpath.c (with uring.c, the io_uring rings of file namespaces: raw system calls,
<linux/io_uring.h> from linux-libc-dev, which libc6-dev depends on) is compiled into
nvme/native/_fastpath.<abi>.so with the
interpreter's headers (Debian: python3-dev; a venv of Debian's python uses them too)
and a C compiler (gcc).  scripts/setup installs both and runs this; when the build
fails the daemon runs the Python data path and says why at start-up.  Exit status:
0 built, 1 not built (the reason on stderr).
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def build(verbose: bool = True) -> str:
    """Compile; returns the path of the module.  Raises on failure (with the reason)."""
    try:
        import cffi
    except ImportError as e:
        raise RuntimeError(f"cffi is not installed ({e}): pip install cffi") from None
    inc = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(inc, "Python.h")):
        raise RuntimeError(f"no Python.h in {inc} (Debian: apt-get install python3-dev)")
    cc = sysconfig.get_config_var("CC") or "cc"
    if shutil.which(cc.split()[0]) is None:
        raise RuntimeError(f"no C compiler ({cc.split()[0]}; Debian: apt-get install gcc)")
    sys.path.insert(0, ROOT)
    from nvme.native import source_id   # the package imports without the extension
    with open(os.path.join(HERE, "fastpath.h")) as f:
        header = f.read()
    with open(os.path.join(HERE, "fastpath.c")) as f:
        source = f.read()
    ffi = cffi.FFI()
    ffi.cdef("\n".join(line for line in header.splitlines() if not line.startswith("#")))
    ffi.set_source("nvme.native._fastpath", source.replace('#include "fastpath.h"', header),
                   sources=[os.path.join(HERE, "uring.c")], include_dirs=[HERE],
                   extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                       "-fno-strict-aliasing", f'-DVN_SOURCE_ID="{source_id()}"'])
    with tempfile.TemporaryDirectory(prefix="vnvmed-native-") as tmp:
        out = ffi.compile(tmpdir=tmp, verbose=verbose)
        dest = os.path.join(HERE, os.path.basename(out))
        shutil.copy(out, dest + ".tmp")
        os.replace(dest + ".tmp", dest)       # never a half-written module
    return dest


def main() -> int:
    quiet = "--quiet" in sys.argv[1:]
    try:
        path = build(verbose=not quiet)
    except Exception as e:
        print(f"nvme.native.build: native data path not built: {e}", file=sys.stderr)
        return 1
    print(f"nvme.native.build: built {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
