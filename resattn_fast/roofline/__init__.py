"""The roofline model's core: a GPU training step predicted from a trace on fake tensors.

- trace.py: a TorchDispatchMode that records the kernels a step launches (FLOPs, bytes,
  op class) and follows the storages it creates (memory), run under FakeTensorMode;
- step.py: traces one training step of a network (in a checkpointing mode), or one fused op;
- devices.py: datasheet figures of the GPUs, with their sources;
- model.py: kernel time ``max(FLOPs / rate, bytes / bandwidth) + launch``, step memory,
  the largest batch that fits.

``resattn plan`` (resattn_fast/plan.py) and the benchmark suite's ``--suite roofline``
(benchmarks/roofline: the report, calibration against a GPU run, the compiled reference)
both use it.
"""
