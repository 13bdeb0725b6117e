"""benchmarks/gpu_check.sh's bookkeeping, without a GPU: the script runs for real with a
stand-in interpreter ($PYTHON) whose steps (build, info, the two pytest passes, the
benchmark runs) report what each scenario says. The exit status and the last line must
tell apart "all passed" (0), "something failed" (1) and "incomplete" (3, naming what did
not run)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from typing import Dict, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

# The stand-in interpreter. Each step's outcome comes from the environment:
#   STUB_BUILD_RC, STUB_INFO_RC, STUB_HEADLINE_RC, STUB_BENCH_RC, STUB_ROOFLINE_RC: exit codes;
#   STUB_CORRECTNESS / STUB_TESTS: "rc passed failed skipped" of the two pytest passes;
#   STUB_BENCH_TIME_SKIPS: rows the benchmark suite leaves out for its time budget.
# The script's own Python snippets (reading junit.xml, the speedups) run on the real one.
STUB = textwrap.dedent(
    """\
    #!{python}
    import os, subprocess, sys
    REAL = {python!r}
    args = sys.argv[1:]
    env = os.environ

    def arg(name):
        for i, a in enumerate(args):
            if a == name:
                return args[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
        return None

    if args[0] == "-c":
        code = args[1]
        if "is_available" in code:
            print(1)
        elif "get_device_name" in code:
            print("Stub GPU")
        elif "get_device_capability" in code:
            print("9.0")
        elif "sys.version" in code:
            print("Python 3, torch stub, triton stub")
        elif "sys.executable" in code:
            print(os.path.dirname(os.path.abspath(__file__)))
        else:
            sys.exit(subprocess.call([REAL, *args]))
    elif args[:2] == ["-m", "pip"]:
        sys.exit(int(env.get("STUB_BUILD_RC", "0")))
    elif args[0] == "setup.py":
        sys.exit(int(env.get("STUB_BUILD_RC", "0")))
    elif args[:2] == ["-m", "resattn_fast"]:
        print("resattn_fast (stub)")
    elif args[0] == "-":
        script = sys.stdin.read()
        if "build_info" in script:
            sys.exit(int(env.get("STUB_INFO_RC", "0")))
        sys.exit(subprocess.run([REAL, "-", *args[1:]], input=script, text=True).returncode)
    elif args[:2] == ["-m", "pytest"]:
        step = "STUB_TESTS" if "not (" in (arg("-k") or "") else "STUB_CORRECTNESS"
        rc, passed, failed, skipped = (int(v) for v in env.get(step, "0 3 0 0").split())
        with open(arg("--junitxml"), "w") as f:
            f.write('<testsuites><testsuite tests="%d" failures="%d" errors="0" skipped="%d"/></testsuites>'
                    % (passed + failed + skipped, failed, skipped))
        print(f"{{passed}} passed, {{failed}} failed")
        sys.exit(rc)
    elif args[0] == "benchmarks/run.py":
        suite, out = arg("--suite"), arg("--out")
        os.makedirs(out, exist_ok=True)
        if suite == "roofline":
            sys.exit(int(env.get("STUB_ROOFLINE_RC", "0")))
        with open(os.path.join(out, "results.csv"), "w") as f:
            f.write("suite,name,impl,backend,mode,dtype,layout,shape,metric,unit,median\\n")
        with open(os.path.join(out, "skipped.csv"), "w") as f:
            f.write("suite,name,impl,backend,mode,dtype,layout,shape,reason\\n")
            f.write("ops,x,fused,cuda,all,float32,nchw,1,backend 'cuda' unavailable\\n")
            for _ in range(int(env.get("STUB_BENCH_TIME_SKIPS", "0"))):
                f.write("ops,x,fused,cuda,all,float32,nchw,2,time budget of the ops suite (9 s) used up\\n")
        sys.exit(int(env.get("STUB_HEADLINE_RC" if suite == "ops" else "STUB_BENCH_RC", "0")))
    else:
        sys.exit(f"stub python: unexpected call {{args}}")
    """
)


@pytest.fixture(scope="module")
def stub_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    path = tmp_path_factory.mktemp("stub") / "python"
    path.write_text(STUB.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _run(stub: str, tmp_path, **scenario: str) -> Tuple[int, str, str]:
    env = dict(os.environ, PYTHON=stub, **scenario)
    for var in ("RESATTN_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST", "GPU_CHECK_BUDGET"):
        if var not in scenario:
            env.pop(var, None)
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    summary = open(tmp_path / "out" / "summary.txt").read()
    return proc.returncode, lines[-1] if lines else "", summary


CASES: Dict[str, Tuple[Dict[str, str], int, str, Tuple[str, ...]]] = {
    # name: (scenario, exit status, last line starts with, and names)
    "all_passed": ({}, 0, "result: PASS", ()),
    "correctness_failed": ({"STUB_CORRECTNESS": "1 2 1 0"}, 1, "result: FAIL: correctness", ()),
    "gpu_tests_failed": ({"STUB_TESTS": "1 9 2 0"}, 1, "result: FAIL: GPU tests", ()),
    "build_failed": ({"STUB_BUILD_RC": "1"}, 1, "result: FAIL: build", ()),
    "headline_failed": ({"STUB_HEADLINE_RC": "1"}, 1, "result: FAIL: headline benchmarks", ()),
    "bench_failed": ({"STUB_BENCH_RC": "1"}, 1, "result: FAIL: benchmark suite", ()),
    # pytest stopped by the deadline (timeout's 124) before any failure
    "gpu_tests_cut_short": ({"STUB_TESTS": "124 5 0 0"}, 3, "result: INCOMPLETE: not run: GPU tests",
                            ("stopped at",)),
    "gpu_tests_cut_short_after_a_failure": ({"STUB_TESTS": "124 5 1 0"}, 1, "result: FAIL: GPU tests",
                                            ("also not run: GPU tests",)),
    # too little budget left for the GPU tests: they never start
    "gpu_tests_not_reached": ({"GPU_CHECK_BUDGET": "125"}, 3, "result: INCOMPLETE: not run: GPU tests",
                              ("not reached",)),
    "bench_cut_short": ({"STUB_BENCH_RC": "124"}, 3, "result: INCOMPLETE: not run: benchmark suite", ()),
    "bench_rows_left_out_for_time": ({"STUB_BENCH_TIME_SKIPS": "4"}, 3,
                                     "result: INCOMPLETE: not run: benchmark suite (4 rows left out for time)",
                                     ()),
    "roofline_fails_but_never_fails_the_check": ({"STUB_ROOFLINE_RC": "1"}, 0, "result: PASS", ()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exit_status_and_last_line(stub_python: str, tmp_path, case: str) -> None:
    scenario, want_rc, want_start, names = CASES[case]
    rc, last, summary = _run(stub_python, tmp_path, **scenario)
    assert (rc, last.startswith(want_start)) == (want_rc, True), f"exit {rc}, last line: {last!r}\n{summary}"
    for name in names:
        assert name in last, last
    assert summary.rstrip().splitlines()[-1] == last  # summary.txt ends with the same verdict
