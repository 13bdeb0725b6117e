"""The roofline model of a GPU training step (``python benchmarks/run.py --suite roofline``).

- trace.py: a TorchDispatchMode that records the kernels a step launches (FLOPs, bytes,
  op class), run under FakeTensorMode;
- step.py: traces one training step of a network, or one fused op;
- devices.py: datasheet figures of the GPUs, with their sources;
- model.py: kernel time ``max(FLOPs / rate, bytes / bandwidth) + launch``, step memory;
- suite.py: the suite (predictions, or calibration against a GPU run's results.csv);
- report.py: results.csv, report.md and the stacked-bar PNG.
"""
