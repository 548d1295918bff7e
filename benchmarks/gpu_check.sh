#!/usr/bin/env bash
# GPU check of widetopo, for a bare Linux machine with an NVIDIA GPU on which Python, a CUDA
# build of torch (>= 2.6, whichever is installed: nothing is pinned or downloaded) and nvcc are
# already installed; no network needed. From the repository root:
#
#     bash benchmarks/gpu_check.sh            # ~5-8 minutes on a current GPU
#
#   1. builds the extension against the installed torch, CUDA kernels forced on, for the
#      architecture of the visible GPU (pip install --no-build-isolation --no-deps .);
#   2. checks that every op has a CUDA kernel (.ci/check_cuda_build.py) and runs the CUDA tests
#      (tests/test_ops_cuda.py: every kernel against the pure-PyTorch reference and the CPU
#      kernel, bit for bit where the rule is exact), failing if they skip;
#   3. times on the GPU every op against its plain-PyTorch baseline and a short WideTopo-S run
#      on a CIFAR ResNet-20 against benchmarks/official_baseline.py, printed as one table
#      (benchmarks/gpu_bench.py);
#   4. peak device memory of a pruning run with the batches on the GPU vs data_device='cpu'
#      (benchmarks/bench_memory.py), checking both give the same masks.
#
# Environment: PYTHON (default python3), MAX_JOBS (default: the number of cores),
# TORCH_CUDA_ARCH_LIST (default: the GPU's own), CUDA_HOME (default: the toolkit behind nvcc),
# OUT (if set: the log gpu_check.log, the table gpu_bench.md and gpu_bench.json go there),
# GPU_CHECK_SKIP_BUILD=1 (use the widetopo_ext already installed), GPU_BENCH_ARGS (extra
# arguments of gpu_bench.py, e.g. "--rounds 5 --prune-rounds 2").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
T0=$SECONDS
LOGDIR="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/widetopo-gpu-check.XXXXXX")}"
mkdir -p "$LOGDIR"
LOG="$LOGDIR/gpu_check.log"
# Everything printed from here on also goes to the log.
exec > >(tee -a "$LOG") 2>&1

step() { echo; echo "==== [$((SECONDS - T0)) s] $*"; }
die() { echo "GPU CHECK FAILED: $*" >&2; exit 1; }
trap 'rc=$?; echo; echo "==== gpu_check: exit $rc after $((SECONDS - T0)) s (log: $LOG)"' EXIT

step "environment"
echo "repo $REPO, log $LOG"
command -v "$PY" >/dev/null || die "no $PY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" - <<'EOF' || die "torch with CUDA and a visible GPU are needed"
import sys
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPUs", torch.cuda.device_count())
assert (major, minor) >= (2, 6), f"torch >= 2.6 is needed, found {torch.__version__}"
assert torch.version.cuda is not None, "this torch has no CUDA"
assert torch.cuda.is_available(), "torch sees no GPU"
print("GPU 0:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
# No network: what the build, the tests and the timings import must already be there.
"$PY" - <<'EOF' || die "missing Python packages (install them first; this script downloads nothing)"
import importlib.util
missing = [m for m in ("pytest", "numpy", "setuptools", "pip") if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit("not installed: " + ", ".join(missing))
print("pytest, numpy, setuptools, pip: present; ninja:", importlib.util.find_spec("ninja") is not None)
EOF

# The toolkit: CUDA_HOME if it has nvcc, else /usr/local/cuda, else ask nvcc where it lives
# (a wrapper script on PATH would make torch guess wrong).
if [[ -z "${CUDA_HOME:-}" || ! -x "${CUDA_HOME:-}/bin/nvcc" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=\(.*\)\/bin\/\.\.$/\1/p' | head -n 1)"
    [[ -n "$CUDA_HOME" ]] || CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  else
    die "no nvcc found (set CUDA_HOME)"
  fi
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
echo "CUDA_HOME=$CUDA_HOME: $("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1)"
# torch's headers include CUDA library headers (cuBLAS, ...) that pip's nvidia-* wheels ship.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for inc in "$SITE"/nvidia/cu[0-9]*/include "$SITE"/nvidia/*/include; do
  [[ -d "$inc" ]] && CPATH="$inc${CPATH:+:$CPATH}"
done
export CPATH="${CPATH:-}"
ARCH="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')}"
export TORCH_CUDA_ARCH_LIST="$ARCH"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

if [[ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]]; then
  step "1. build against the installed torch: FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$MAX_JOBS"
  # Build from a copy, so that a CPU build's build/ directory or .so in the tree is not reused.
  SRC="$LOGDIR/src"
  rm -rf "$SRC"
  mkdir -p "$SRC"
  tar -C "$REPO" --exclude=./build --exclude=./.git --exclude='*.so' --exclude='*.egg-info' \
    --exclude=__pycache__ -cf - . | tar -C "$SRC" -xf -
  (cd "$SRC" && FORCE_CUDA=1 "$PY" -m pip install -v --no-build-isolation --no-deps . \
    >"$LOGDIR/build.log" 2>&1) || { tail -n 60 "$LOGDIR/build.log"; die "build failed (log: $LOGDIR/build.log)"; }
  grep -E "widetopo setup:|Successfully installed" "$LOGDIR/build.log" || true
fi

step "2a. every op has a CUDA kernel for sm_${ARCH/./}"
# From outside the tree: the installed package, not the sources.
(cd "$LOGDIR" && "$PY" "$REPO/.ci/check_cuda_build.py" --archs "$ARCH") || die "the installed build lacks CUDA kernels"

step "2b. CUDA tests (tests/test_ops_cuda.py)"
RC=0
(cd "$LOGDIR" && "$PY" -m pytest "$REPO/tests/test_ops_cuda.py" -p no:cacheprovider -q -rs \
  --junitxml="$LOGDIR/test_ops_cuda.xml") || RC=$?
[[ $RC -eq 0 ]] || die "CUDA tests failed (exit $RC)"
# A run where everything skipped (no GPU seen, CPU-only build) is not a pass.
"$PY" - "$LOGDIR/test_ops_cuda.xml" <<'EOF' || die "CUDA tests were skipped"
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n, skipped = int(suite.get("tests")), int(suite.get("skipped"))
print(f"{n - skipped} CUDA tests ran, {skipped} skipped")
sys.exit(0 if n - skipped >= 20 and skipped == 0 else 1)
EOF

step "3. GPU timings: ops vs plain PyTorch, WideTopo-S vs the official-structure baseline"
# shellcheck disable=SC2086
(cd "$LOGDIR" && "$PY" "$REPO/benchmarks/gpu_bench.py" --device cuda --json "$LOGDIR/gpu_bench.json" \
  ${GPU_BENCH_ARGS:-}) | tee "$LOGDIR/gpu_bench.out"
sed -n '/^| group/,$p' "$LOGDIR/gpu_bench.out" >"$LOGDIR/gpu_bench.md"
[[ -s "$LOGDIR/gpu_bench.md" ]] || die "gpu_bench.py printed no table"

step "4. pruning-set memory: batches on the GPU vs data_device='cpu' (same masks)"
(cd "$LOGDIR" && "$PY" "$REPO/benchmarks/bench_memory.py" --device cuda --samples 2048) | tee "$LOGDIR/bench_memory.md"

step "done: GPU check passed in $((SECONDS - T0)) s; table in $LOGDIR/gpu_bench.md"
