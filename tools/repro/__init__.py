"""The parts of ``tools/reproduce.py`` (``docs/RESULTS.md``), one purpose a module.

- :mod:`.config` — models, data, seeds, the decomposition and budget configurations;
- :mod:`.formatting` — numbers, layer names and markdown tables as text;
- :mod:`.results` — the plain-data results of a run (:class:`.results.Results`);
- :mod:`.experiments` — the runs: isolated single-layer errors, ``decompose``, latency;
- :mod:`.finetune` — the short torch fine-tune of a decomposed model;
- :mod:`.claims` — the paper's claims and their verdicts, computed from the results;
- :mod:`.discussion` — the prose around the verdicts;
- :mod:`.render` — the RESULTS.md text;
- :mod:`.plots` — the two figures.

``tools/reproduce.py`` runs them in order. torch and matplotlib are imported only inside the
functions that need them, so every module imports (and is tested) without them. The modules
import their ``tools/`` neighbours (``budget_study``, ``evaluate``, ``onnx_torch``, ``provenance``,
``train``) by plain name: ``tools/`` must be on ``sys.path``, as it is for the scripts there.
"""
