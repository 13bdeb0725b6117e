"""``resattn plan``: the largest batch per checkpointing mode and its predicted images/s
(the roofline model on fake tensors: no GPU), and its one-line errors."""

from __future__ import annotations

from typing import List

import pytest
from conftest import require_backend

from resattn_fast import cli
from resattn_fast.plan import plan
from resattn_fast.roofline.step import fast_backend_problem


@pytest.fixture
def _needs_ext() -> None:
    """The planner traces the cpu backend's registered ops: a skip without them, a failure in CI."""
    require_backend("cpu")
    assert fast_backend_problem() is None, fast_backend_problem()


needs_ext = pytest.mark.usefixtures("_needs_ext")


def _fails(capsys: pytest.CaptureFixture, argv: List[str], *fragments: str) -> None:
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resattn plan: error: "), err
    for frag in fragments:
        assert frag in lines[0], lines[0]


@pytest.mark.parametrize("argv, fragments", [
    (["--model", "attention57", "--gpu", "H100"], ("--model", "attention57", "Valid names: attention56,")),
    (["--model", "attention56", "--gpu", "V100"], ("--gpu", "V100")),
    (["--model", "attention56", "--gpu", "H100", "--amp", "fp8"], ("--amp", "fp8")),
    (["--model", "attention56", "--gpu", "H100", "--image-size", "0"], ("--image-size",)),
    (["--model", "attention56", "--gpu", "H100", "--image-size", "100000"], ("--image-size",)),
])
def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture, argv: List[str], fragments: tuple) -> None:
    _fails(capsys, argv, *fragments)


@needs_ext
def test_an_image_too_small_for_the_network_is_one_line(capsys: pytest.CaptureFixture) -> None:
    _fails(capsys, ["--model", "attention56_cifar", "--gpu", "A100", "--image-size", "2"],
           "--image-size 2", "attention56_cifar cannot take it")


@needs_ext
def test_plan_prints_each_mode_labelled_as_a_prediction(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["plan", "--model", "attention56_cifar", "--gpu", "A100", "--channels-last"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTED" in out and "not measured" in out
    lines = out.splitlines()
    for mode in ("none", "selective", "full"):
        assert any(line.startswith(mode) for line in lines), out


@needs_ext
def test_full_checkpointing_fits_a_larger_batch_at_a_lower_rate() -> None:
    rows = {r.mode: r for r in plan("attention56_cifar", "H200", modes=("none", "full"))}
    none, full = rows["none"], rows["full"]
    assert none.max_batch > 0 and full.max_batch > none.max_batch
    assert full.peak_bytes_per_image < none.peak_bytes_per_image
    assert none.step_ms > 0 and none.images_per_s == pytest.approx(none.max_batch / (none.step_ms / 1e3))
