"""Calibration data: arrays files, image folders and onnxruntime-style readers.

Every source is turned into one :class:`CalibrationData` that hands out fixed-size batches
of model feeds, always in the same order, as many passes as the caller wants:

========================  ==============================================================
source                    how it is read
========================  ==============================================================
``data.npy``              one array, single-input models only; memory-mapped
``data.npz``              one array per graph input name, keys exactly the input names
                          (stored members memory-mapped); a single array feeds a
                          single-input model whatever its key (a note names it)
``folder/``               ``*.jpg|*.jpeg|*.png`` sorted by name, decoded per batch with
                          Pillow, resize (shorter side) + center crop, ``/255``,
                          ``(x - mean) / std``, NCHW
reader object             ``get_next() -> {name: array} | None``; ``rewind()`` before each
                          pass when it exists, otherwise cached on the first pass
``ndarray`` / ``dict``    in-memory arrays, same rules as ``.npy`` / ``.npz``
========================  ==============================================================

At most :data:`DEFAULT_CALIB_SIZE` samples are read unless ``calib_size`` says otherwise
(accuracy saturates at 256–512 images, docs/ACCURACY.md): only those rows are read, and
:attr:`CalibrationData.notes` says when the source held more.

**Inputs without a sample axis.** Axis 0 of an input is its sample (batch) axis when it is
dynamic in the model; when no input has a dynamic axis 0 (a fixed-batch model), the inputs
whose axis 0 equals the first input's carry the samples. Every other input — a rank-0 scalar,
a ``[1]``-shaped scale, a conv weight fed as a graph input — has no sample axis
(:func:`batch_inputs`). Its data is either one value of exactly the input's shape, fed with
every batch, or one value per sample: an array ``(N, *shape)``, or ``(N, *shape[1:])`` when
the input's axis 0 is 1. Values that differ between samples cannot share a run: calibration
then runs one sample at a time (:attr:`CalibrationData.max_batch` is 1; a model with a fixed
batch above 1 is an error). A reader gives each such input one value per ``get_next()`` feed.

All the checks run up front in :func:`load_calibration` (one validation pass, chunked for
memory-mapped files), so a problem in the data is reported before any statistics are
gathered. Values must be finite and at most :data:`MAX_ABS` in magnitude (the statistics are
float32 products of values). Memory: ``.npy`` files and stored ``.npz`` members are
memory-mapped; a compressed ``.npz`` member is decompressed — only its first ``calib_size``
rows — after its header's declared shape and dtype were checked against the model and the
bytes against the available memory (:mod:`onnx_dwdecomp.memory`); a reader without
``rewind()`` is cached under the same check. Problems raise
:class:`~onnx_dwdecomp.errors.CalibrationError` (the data),
:class:`~onnx_dwdecomp.errors.OptionError` (an argument) or
:class:`~onnx_dwdecomp.errors.ResourceError` (not enough memory), with a one-line message
saying what is wrong, where, and what was expected.

Modules, in the order data flows through them:

==============  ==========================================================================
``specs``       :class:`InputSpec` (what a graph input expects), which inputs carry the
                samples, and the checks every value goes through (layout, dtype, finite)
``arrays``      ``.npy`` / ``.npz`` parsing: memory maps, compressed members read lazily
``sources``     the :class:`~onnx_dwdecomp.data.sources.Source` protocol and random-access
                array sources, validated in one chunked pass
``images``      image folders (Pillow, imported only when a folder is read)
``readers``     ``CalibrationDataReader`` objects and ``--calib-reader MODULE:CALLABLE``
``dataset``     :func:`load_calibration` and :class:`CalibrationData` (the batches)
==============  ==========================================================================

Numeric only: numpy, plus Pillow imported lazily for image folders. The names below are the
package's face for code outside it; the package's own modules import from the submodules.
"""

from .dataset import DEFAULT_CALIB_SIZE, Batch, CalibrationData, load_calibration
from .readers import load_reader
from .specs import InputSpec, fix_dims, fixed_batch

__all__ = ["Batch", "CalibrationData", "DEFAULT_CALIB_SIZE", "InputSpec", "fix_dims", "fixed_batch",
           "load_calibration", "load_reader"]
