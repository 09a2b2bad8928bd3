"""Planning: what each candidate conv becomes.

- ``pricing``: each conv's options (multipliers) and what they cost — MACs, and their time
  inside the whole model;
- ``sensitivity``: each layer's gain on the output error, from single-layer probes;
- ``error_model``: a plan's output error predicted from the layers' error curves, their
  gains and the interaction scale α — ``predict(plan)``, ``rescale(measured)``;
- ``budget``: allocating multipliers under a MACs, latency or error budget (numpy only);
- ``planner``: what every mode's strategy shares — the rounds and the round chosen, the
  trade-off frontier, the kept convs' reasons, the report's record;
- ``strategies``: one strategy per mode (``MaxError``, ``TargetMacs``, ``TargetLatency``,
  ``TaskSearch``): the plans it proposes, the rounds it takes back;
- ``search``: solving what a strategy proposes, the whole-model check, which plan is handed back;
- ``tuning``: the task-aware search's parts — tolerance, candidates, bisection, the user's scores.
"""
