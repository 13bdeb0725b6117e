"""set_grad_checkpointing("none" | "selective" | "full"): the same gradients and the same
running statistics as without checkpointing, in float32, under bfloat16 autocast, in
channels_last, under torch.compile and DDP; selective really drops the BN-ReLU outputs;
`resattn train --grad-checkpointing` records the mode and --resume keeps it.

Each check trains twins (same weights, same batches) for a few SGD steps: the "none" twin
and one per mode. Gradients are compared at every step, the parameters, running
statistics and num_batches_tracked after the last one.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import REQUIRED, require_backend

import resattn_fast
from benchmarks.memory import LiveBytes
from resattn_fast import cli
from resattn_fast.models import NetConfig, ResidualAttentionNet
from resattn_fast.ops import _recompute

MODES = ("none", "selective", "full")
STEPS = 2
# Float32 tolerance of the battery; a recomputation runs the very same kernels on the very
# same inputs, so in practice the gradients agree bit for bit.
ATOL = RTOL = 1e-5


def _fused_cpu_backend() -> str:
    """The compiled CPU backend, with its batch_norm_relu kernel (skip when not built)."""
    require_backend("cpu")
    x = torch.randn(2, 3, 4, 4)
    try:
        resattn_fast.ops.batch_norm_relu(x, None, None, training=True, backend="cpu")
    except NotImplementedError as exc:
        if "cpu" in REQUIRED:
            pytest.fail(f"backend 'cpu' has no batch_norm_relu kernel: {exc}")
        pytest.skip("this build of the cpu backend has no batch_norm_relu kernel")
    return "cpu"


def _tiny_config() -> NetConfig:
    # Two attention stages (mask depths 1) on 16x16 inputs: every kind of block, cheap.
    return NetConfig(name="tiny", stem="cifar", stem_channels=8, stages=((16, 1, 1, 1), (32, 1, 1, 2)),
                     last_stage=None, num_classes=10, input_size=16)


def _twins(make: Callable[[], torch.nn.Module], modes: Union[Sequence[str], Dict[str, str]] = MODES,
           channels_last: bool = False) -> Dict[str, torch.nn.Module]:
    """Models with the same weights, keyed by label, each in its mode (``modes``: the mode
    names, or {label: mode})."""
    modes = modes if isinstance(modes, dict) else {m: m for m in modes}
    torch.manual_seed(0)
    base = make()
    out = {}
    for label, mode in modes.items():
        m = make()
        m.load_state_dict(base.state_dict())
        m.set_grad_checkpointing(mode)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        out[label] = m.train()
    return out


def _batches(n: int, batch: int, size: int, channels_last: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 10, (batch,), generator=g)))
    return out


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          amp: Optional[torch.dtype], run: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        loss = F.cross_entropy((model if run is None else run)(x), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grads


def _assert_same_training(models: Dict[str, torch.nn.Module], batches, amp: Optional[torch.dtype] = None,
                          runs: Optional[Dict[str, Callable]] = None) -> None:
    """Train each model on ``batches``; every mode's gradients, parameters and buffers
    must equal the "none" model's."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for k, m in models.items()}
    for i, (x, y) in enumerate(batches):
        grads = {k: _step(m, opts[k], x, y, amp, (runs or {}).get(k)) for k, m in models.items()}
        for mode, g in grads.items():
            for name, want in grads["none"].items():
                torch.testing.assert_close(g[name], want, atol=ATOL, rtol=RTOL,
                                           msg=lambda m, n=name, k=mode, i=i: f"step {i + 1}, {k}, grad of {n}: {m}")
    ref = models["none"].state_dict()
    for mode, m in models.items():
        for name, v in m.state_dict().items():
            torch.testing.assert_close(v, ref[name], atol=ATOL, rtol=RTOL,
                                       msg=lambda msg, n=name, k=mode: f"{k}, {n} after {len(batches)} steps: {msg}")
            if name.endswith("num_batches_tracked"):
                assert int(v) == len(batches), f"{mode}: {name} = {int(v)}, not once per step"


# --------------------------------------------------------------------------- whole networks


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["float32", "bf16-autocast", "channels_last"])
def test_modes_train_like_none_attention56_cifar(variant):
    backend = _fused_cpu_backend()
    cl = variant == "channels_last"
    models = _twins(lambda: resattn_fast.create_model("attention56_cifar", impl="fast", backend=backend),
                    channels_last=cl)
    amp = torch.bfloat16 if variant == "bf16-autocast" else None
    _assert_same_training(models, _batches(STEPS, 2, 32, cl), amp)


@pytest.mark.slow
def test_modes_train_like_none_imagenet_stem():
    """attention56 (ImageNet stem and stages, mask depths 3/2/1) on a small 64x64 input."""
    backend = _fused_cpu_backend()
    models = _twins(lambda: resattn_fast.create_model("attention56", num_classes=10, impl="fast",
                                                      backend=backend))
    _assert_same_training(models, _batches(2, 2, 64))


def test_selective_needs_the_fast_model():
    model = resattn_fast.create_model("attention56_cifar", impl="reference")
    with pytest.raises(ValueError, match='needs the fast model'):
        model.set_grad_checkpointing("selective")
    with pytest.raises(ValueError, match="must be one of"):
        model.set_grad_checkpointing("some")


# --------------------------------------------------------------------------- what selective keeps


def test_selective_drops_every_bn_relu_output_a_convolution_saves(monkeypatch):
    """Selective packs each fused BN-ReLU output that a later op saves as a recipe (3 per
    residual unit, 2 per mask head, the stem's, which the max-pool keeps), and the bytes
    alive after the forward pass (LiveBytes: every storage the step allocates) fall by
    exactly those outputs."""
    backend = _fused_cpu_backend()
    models = _twins(lambda: resattn_fast.create_model("attention56", num_classes=10, impl="fast",
                                                      backend=backend))
    x, y = _batches(1, 2, 64)[0]
    dropped: Dict[int, int] = {}  # recipe -> bytes of the output it stands for
    pack = _recompute._pack

    def counting_pack(t):
        packed = pack(t)
        if isinstance(packed, _recompute._Recipe):
            # once per output: a unit's first BN-ReLU output feeds two convolutions when
            # its shortcut is a convolution, and is packed by both
            dropped[id(packed)] = t.untyped_storage().nbytes()
        return packed

    monkeypatch.setattr(_recompute, "_pack", counting_pack)
    kept = {}
    for mode, m in models.items():
        dropped.clear()
        with LiveBytes() as mem:
            loss = F.cross_entropy(m(x), y)
            kept[mode] = mem.live
        loss.backward()
        if mode == "selective":
            n_dropped, bytes_dropped = len(dropped), sum(dropped.values())
        else:
            assert not dropped
    model = models["selective"]
    units = sum(1 for mod in model.modules() if type(mod).__name__ == "ResidualUnit")
    heads = sum(1 for mod in model.modules() if type(mod).__name__ == "AttentionModule")
    assert n_dropped == 3 * units + 2 * heads + 1
    assert kept["none"] - kept["selective"] == bytes_dropped
    assert kept["full"] < kept["selective"] < kept["none"]


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_modes_under_torch_compile():
    """A small network compiled (inductor) as one graph (fullgraph: full checkpointing's
    blocks must not break it): each mode trains like the eager "none" twin."""
    backend = _fused_cpu_backend()
    torch._dynamo.reset()

    def make():
        m = ResidualAttentionNet(_tiny_config())
        return resattn_fast.convert(m, "fast", backend=backend)

    models = _twins(make, {"none": "none", "compiled none": "none", "compiled selective": "selective",
                           "compiled full": "full"})
    runs = {k: torch.compile(m, fullgraph=True) for k, m in models.items() if k != "none"}
    _assert_same_training(models, _batches(2, 4, 16), runs=runs)


# --------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, backend: str) -> None:
    from resattn_fast.train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup("cpu")
    try:
        def make():
            m = ResidualAttentionNet(_tiny_config())
            return resattn_fast.convert(m, "fast", backend=backend)

        models = _twins(make)
        wrapped = {k: torch.nn.parallel.DistributedDataParallel(m) for k, m in models.items()}
        batches = _batches(2 * world, 2, 16)[rank::world]
        _assert_same_training(models, batches, runs=wrapped)
    finally:
        distributed.cleanup()


def test_modes_under_ddp_gloo_two_processes():
    """Two ranks (gloo), each training DDP twins: the gradients all-reduced by DDP and the
    running statistics agree with "none" in every mode."""
    backend = _fused_cpu_backend()
    mp.spawn(_ddp_worker, args=(2, _free_port(), backend), nprocs=2, join=True)


# --------------------------------------------------------------------------- resattn train


TINY = ["--model", "attention56_cifar", "--data", "digits", "--train-subset", "32", "--val-subset", "16",
        "--batch-size", "16", "--threads", "1", "--log-every", "0", "--impl", "reference"]


def _recorded(run) -> Tuple[str, str]:
    cfg = json.load(open(run / "config.json"))["config"]["grad_checkpointing"]
    last = torch.load(run / "last.pt", weights_only=True)["config"]["grad_checkpointing"]
    return cfg, last


def test_train_records_the_mode_and_resume_keeps_it(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(run), "--epochs", "1", "--grad-checkpointing"]) == 0
    assert _recorded(run) == ("full", "full")
    assert cli.main(["train", *TINY, "--out", str(run), "--epochs", "2", "--resume"]) == 0
    assert _recorded(run) == ("full", "full")
    assert cli.main(["train", *TINY, "--out", str(run), "--epochs", "3", "--resume",
                     "--grad-checkpointing", "none"]) == 0
    assert _recorded(run) == ("none", "none")
