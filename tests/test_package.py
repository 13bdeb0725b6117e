"""The package imports and works without its compiled extension (reference backend)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_EXT = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NoExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "resattn_fast._C":
                raise ImportError("simulated: resattn_fast._C was not built")
            return None

    sys.meta_path.insert(0, _NoExtension())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_EXT + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_imports_and_runs_without_extension():
    proc = _run(
        """
        import os
        os.environ.pop("RESATTN_BACKEND", None)
        import torch, resattn_fast
        assert resattn_fast.available_backends("cpu")[0] != "cpu", resattn_fast.available_backends("cpu")
        assert not resattn_fast.build_info()["loaded"]
        model = resattn_fast.create_model("attention56_cifar")  # impl="fast" falls to reference
        print(model(torch.randn(1, 3, 32, 32)).shape)
        try:
            resattn_fast.ops.attention_residual(torch.randn(2), torch.randn(2), backend="cpu")
        except resattn_fast.ops.BackendUnavailableError as exc:
            print("ERR", exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([1, 10])" in proc.stdout
    assert "ERR resattn_fast: backend='cpu' is not available: the compiled extension" in proc.stdout
    assert "simulated: resattn_fast._C was not built" in proc.stdout


def test_info_reports_missing_extension():
    proc = _run(
        """
        import sys
        from resattn_fast.cli import main
        sys.exit(main(["info"]))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "extension    NOT loaded: the reference backend runs instead" in proc.stdout
    assert "simulated: resattn_fast._C was not built" in proc.stdout


def test_info_with_extension():
    proc = subprocess.run([sys.executable, "-m", "resattn_fast", "info"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resattn_fast " in proc.stdout and "cpu          backends:" in proc.stdout
