r"""Calibration: run data through onnxruntime and gather each conv's input statistics.

Multi-layer (asymmetric) correction needs, for layer ``k``, its input ``x`` in the original
network and ``x̂`` in the network whose layers ``< k`` are already decomposed. Running the
whole network once per layer would cost K passes. Instead the graph is cut just before every
candidate conv into *segments*; the tensors alive across a cut (the conv's input and any skip
connection) are kept for all samples, once for the original network and once for the
decomposed one. Segment ``k`` runs from the previous cut (starting with layer ``k−1``, which
the decomposed copy replaces by its new two-conv form) to the next, so the total work is about
one pass of each network plus the solves. Cut tensors go to memory-mapped files in a private
temporary folder once they exceed a memory budget. Segments are in-memory models whose cut
tensors are graph outputs, so onnxruntime's graph optimisations (fusions, layout changes) can
stay on: they never remove a graph output (about 20 % faster than with optimisations off).

Cut tensors, by dataflow (:func:`~.segments.plan_segments`, :class:`~.store.TensorStore`):

- *static*: no graph input reaches them (``Constant`` weights, casts of initializers). Each
  segment recomputes them (:func:`~.segments.static_producers`).
- *shape-derived*: graph inputs reach them only through inputs that an op reads for their
  metadata, never their values — the shape (``Shape``, ``Size``, ``EyeLike``) or the element
  type (``CastLike``'s second input). These are the ``Shape → Gather → Cast/Mul → Range/
  Reshape/Expand/ConstantOfShape/Concat`` chains and 0-d scalars of torch.onnx exports. They
  carry no sample axis but may depend on the batch's row count (``Shape(x)[0]``): kept *per
  batch*, one value per calibration batch. They are computed for both networks, not shared: a
  shape can depend on values (``NonZero``, a ``Reshape`` to a computed target).
- the rest depend on the data: kept *per sample*, one array with sample ``i`` in row ``i``,
  while every batch's value has that batch's row count (padded count included) as its leading
  dimension and the same trailing shape; otherwise — a sample axis elsewhere, like an RNN's
  (T, N, C) output, or none, like a reduction over the batch — per batch too.

Segments run the same batches in the same order, so either way a segment is fed exactly what
the previous one computed for that batch, the padding rows of a fixed-batch model's last batch
included. A decomposed conv's input must come out per sample, since the statistics read it row
by row; it is never made per batch for being shape-derived (a Conv's axis 0 is its batch axis,
e.g. a parameter expanded to the batch), and one that is not per sample stops calibration with
a :class:`~onnx_dwdecomp.errors.CalibrationError`.

Statistics, not activations: at ``positions`` seeded output positions per sample we gather the
patch vectors (length ``C_in·kh·kw``; statistics come out channel-major like the conv weight) and accumulate
running sums (float64) — ``Σx``, ``Σx̂``, ``Σx̂x̂ᵀ``, ``Σ(Wx)x̂ᵀ``, ``ΣWx``, ``Σ‖Wx‖²`` — from
which :class:`~onnx_dwdecomp.solve.LayerStats` follows (``Σx̂x̂ᵀ`` by a symmetric rank-m update;
in the symmetric pass the response sums follow from ``Σxxᵀ``, see :class:`MomentSums`). A seeded
held-out share of the samples is left out of the sums; after the solve, each layer's response
error is measured directly on the held-out patches (:func:`heldout_response_error`; gathered
once per layer, :class:`HeldoutPatches`, however many candidates are measured).

Modules, in the order a pass uses them:

==============  ==========================================================================
``patches``     patch geometry: padding, output size, patch vectors, positions per sample
``moments``     :class:`~.moments.MomentSums`, the running sums behind ``LayerStats``
``holdout``     the held-out split (one count rule) and the direct held-out response error
``segments``    the graph cut before every calibrated conv, segment models
``store``       each network's cut tensors, spilled to disk past the budget
``driver``      :func:`~.driver.calibrate_and_solve`: the symmetric and asymmetric passes
==============  ==========================================================================
"""
