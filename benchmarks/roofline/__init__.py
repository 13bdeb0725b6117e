"""The roofline model of a GPU training step (``python benchmarks/run.py --suite roofline``).

The core (tracing, the device table, kernel time and memory) lives in the package,
resattn_fast/roofline, so that ``resattn plan`` can use it; here:

- suite.py: the suite (predictions, or calibration against a GPU run's results.csv);
- fusion.py: the ``reference+compile`` row (an ideal fusion of the reference's kernels);
- inductor_check.py: inductor's own scheduler on one network's reference step, beside it;
- report.py: results.csv, report.md and the stacked-bar PNG.

What comes from PyTorch and what is written here (both ends of the supported window,
torch 2.11 and 2.14, give identical results):

- FLOPs: ``torch.utils.flop_counter.flop_registry``, the formulas FlopCounterMode uses
  (the tests check the totals against FlopCounterMode itself); views to skip: also
  ``torch.utils._runtime_estimation``'s list.
- Datasheet figures: ``torch._inductor.analysis.device_info`` has no H200 and, in torch
  2.11, gives Hopper's sparse matrix rate as if dense; devices.py has its own cited
  table and the report prints torch's entry beside it as a cross-check.
- Not used: ``torch.distributed._tools``' RuntimeEstimator prices ops by querying the
  current CUDA device (torch 2.11 has no way to name a GPU instead) and counts each
  op's inputs plus outputs, so an in-place op, ``copy_``, a convolution's backward (two
  kernels) or a foreach op (several launches) come out wrong; MemTracker works on fake
  tensors but more than doubles the trace time, so the trace follows the storages it
  creates itself (trace.LiveStorages).
"""
