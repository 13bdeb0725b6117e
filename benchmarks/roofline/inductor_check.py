"""Cross-check of fusion.py's ideal fusion against inductor's own decisions, without a GPU.

The reference training step (forward with the loss, backward) is compiled with
torch.compile through AOTAutograd (inductor's decompositions and min-cut partitioner),
and each of its graphs is lowered and scheduled by inductor (GraphLowering, Scheduler)
with the Triton backend's fusion rules, stopping before code generation: no kernel is
compiled, the graphs run eagerly on small real CPU tensors. For every kernel inductor would
generate, its bytes are inductor's own count (``get_read_write_buffers_sizes``: each
buffer once, buffers consumed inside a fused kernel not written); external kernels
(convolutions, matrix products, fallbacks) are left out, as fusion.py leaves them.

The same step, traced and fused by fusion.py's rule at the same batch, is set beside it.
Private inductor APIs: read defensively; a failure is reported, never raised.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F

__all__ = ["inductor_kernels", "ideal_kernels", "cross_check"]


def inductor_kernels(net: str, batch: int, *, amp: bool, channels_last: bool) -> Dict[str, Dict[str, Any]]:
    """Per phase ("forward", "backward"): the kernels inductor generates for the reference
    step of ``net`` at ``batch``: count, bytes, and the external kernels' op names."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._guards import detect_fake_mode
    from torch._inductor.codegen.triton import TritonScheduling
    from torch._inductor.debug import DebugContext
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.graph import GraphLowering
    from torch._inductor.scheduler import (
        ExternKernelSchedulerNode,
        NopKernelSchedulerNode,
        Scheduler,
    )
    from torch._inductor.virtualized import V

    import resattn_fast
    from resattn_fast.models import CONFIGS

    out: Dict[str, Dict[str, Any]] = {p: {"kernels": 0, "bytes": 0, "extern": {}} for p in ("forward", "backward")}

    def compiler(phase: str) -> Callable[..., Any]:
        def compile_graph(gm: torch.fx.GraphModule, example_inputs: List[Any]) -> Any:
            with V.set_fake_mode(detect_fake_mode(example_inputs)), DebugContext():
                graph = GraphLowering(gm, example_inputs=example_inputs, is_inference=False,
                                      is_backward=phase == "backward")
                with V.set_graph_handler(graph):
                    graph.run(*example_inputs)
                    sched = Scheduler(graph.operations)
                    for node in sched.nodes:
                        if isinstance(node, NopKernelSchedulerNode):
                            continue
                        if isinstance(node, ExternKernelSchedulerNode):
                            name = str(getattr(node.node, "python_kernel_name", None) or type(node.node).__name__)
                            out[phase]["extern"][name] = out[phase]["extern"].get(name, 0) + 1
                            continue
                        out[phase]["kernels"] += 1
                        out[phase]["bytes"] += int(node.get_read_write_buffers_sizes())
            return make_boxed_func(gm.forward)

        return compile_graph

    backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                           decompositions=select_decomp_table(), partition_fn=min_cut_rematerialization_partition)
    original = Scheduler.create_backend
    Scheduler.create_backend = lambda self, device: TritonScheduling(self)  # the GPU's fusion rules
    try:
        torch.manual_seed(0)
        model = resattn_fast.create_model(net, impl="reference")
        model.train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        size = CONFIGS[net].input_size
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
        y = torch.randint(0, model.num_classes, (batch,))

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x), y)

        torch._dynamo.reset()
        compiled = torch.compile(step, backend=backend, fullgraph=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with autocast:
            loss = compiled(x, y)
        loss.backward()
    finally:
        Scheduler.create_backend = original
        torch._dynamo.reset()
    return out


def ideal_kernels(net: str, batch: int, *, amp: bool, channels_last: bool) -> Dict[str, Dict[str, Any]]:
    """The same, from fusion.py's ideal fusion of the traced eager step."""
    from resattn_fast.roofline.step import trace_step
    from resattn_fast.roofline.trace import COMPILED

    from .fusion import compiled_step

    tr = compiled_step(trace_step(net, "reference", batch, amp=amp, channels_last=channels_last))
    out: Dict[str, Dict[str, Any]] = {}
    for phase in ("forward", "backward"):
        recs = [r for r in tr.records if r.phase == phase and r.cls == COMPILED]
        out[phase] = {"kernels": len(recs), "bytes": sum(r.bytes for r in recs)}
    return out


def cross_check(net: str, batch: int, *, amp: bool, channels_last: bool,
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Both counts side by side, with the time each took; ``error`` set if inductor failed."""
    t0 = time.perf_counter()
    result: Dict[str, Any] = {"net": net, "batch": batch}
    try:
        result["inductor"] = inductor_kernels(net, batch, amp=amp, channels_last=channels_last)
    except Exception as exc:  # private APIs: report, do not fail the suite
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    result["inductor_s"] = time.perf_counter() - t0
    result["ideal"] = ideal_kernels(net, batch, amp=amp, channels_last=channels_last)
    log(f"  inductor cross-check {net} batch {batch}: {result.get('error') or result['inductor']} "
        f"(took {result['inductor_s']:.0f} s); ideal {result['ideal']}")
    return result
