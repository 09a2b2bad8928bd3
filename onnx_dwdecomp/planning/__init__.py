"""Planning: what each candidate conv becomes.

- ``pricing``: each conv's options (multipliers) and what they cost — MACs, and their time
  inside the whole model;
- ``sensitivity``: each layer's gain on the output error, from single-layer probes;
- ``error_model``: a plan's output error predicted from the layers' error curves, their
  gains and the interaction scale α — ``predict(plan)``, ``rescale(measured)``;
- ``budget``: allocating multipliers under a MACs, latency or error budget (numpy only);
- ``planner``: the budget planner — its rounds, the trade-off frontier, the kept convs'
  reasons;
- ``search``: the verified rounds, the whole-model check, which plan is handed back;
- ``tuning``: the task-aware search against the user's ``--eval`` metric.
"""
