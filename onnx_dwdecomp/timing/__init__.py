"""Timing in onnxruntime: what the plan's latency decisions rest on.

- ``clock``: interleaved rounds, the clock that fits the thread count, the machine's load, the
  environment record;
- ``records``: ConvConfig and Timing, the records the selector and the cache share;
- ``latency``: a conv and its replacement timed alone, the noise band, the selector;
- ``node_profile``: each node's time inside the whole model (onnxruntime's per-node profile);
- ``model``: the chosen plan timed as a whole model against the all-regular one;
- ``cache``: timings and profiles kept across runs, keyed by configuration, onnxruntime and CPU.
"""
