"""Fine-tune a decomposed ONNX model a few epochs in torch on MNIST (RESULTS.md section 2's last column).

The short fine-tune of section 2's last column: a decomposed ONNX model trained a few epochs in
torch on the MNIST training split, its weights written back into the same ONNX graph.

The model runs in torch through ``tools/onnx_torch.py``; the training loop and the recipe are
``tools/train.py``'s (``sgd_epochs``, ``Recipe``). torch is imported inside the functions only.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx_torch import onnx_to_torch, replace_initializers

from .config import DATA_SEED, SEED

#: Chosen before looking at any result (not tuned on the test set): a tenth of the training
#: learning rate, a sixth of its epochs, no warm-up; ``tools/train.py``'s recipe otherwise.
EPOCHS = 5
LR = 0.01


def make_recipe(epochs: int = EPOCHS, lr: float = LR):
    """The fine-tune's ``train.Recipe`` (imports torch); seeded with ``config.SEED``."""
    import train

    return train.Recipe(epochs=epochs, lr=lr, warmup_epochs=0)


def finetune(model: onnx.ModelProto, recipe, threads: int, say=print) -> tuple[onnx.ModelProto, dict]:
    """Fine-tune ``model`` in torch on the MNIST training split; return the updated ONNX and a log.

    The graph is untouched: only the Conv/Gemm initializers get the trained values.
    """
    import torch
    import train

    torch.set_num_threads(threads)
    # Denormal activations/gradients appear while training the decomposed nets; without flushing
    # them a step took 0.3–4 s instead of 0.06 s on this machine (x86 microcode assists).
    torch.set_flush_denormal(True)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    xtr_u8, ytr, xte_u8, _ = train.load_split(DATA_SEED)
    x_train, y_train = train.preprocess(xtr_u8), torch.from_numpy(ytr)
    module = onnx_to_torch(model)

    # The converted module must compute what onnxruntime computes.
    from onnx_dwdecomp.runtime import make_session
    probe = train.preprocess(xte_u8[:8])
    sess = make_session(model)
    ref = sess.run(None, {sess.get_inputs()[0].name: probe.numpy()})[0]
    module.eval()
    with torch.no_grad():
        got = module(probe).numpy()
    diff = float(np.max(np.abs(got - ref)))
    if diff > 1e-3:
        raise RuntimeError(f"onnx_to_torch differs from onnxruntime by {diff:.2e}")

    history = []
    t0 = time.perf_counter()
    for loss, _ in train.sgd_epochs(module, recipe, x_train, y_train, gen):
        history.append(loss)
        say(f"    fine-tune epoch {len(history)}/{recipe.epochs}: loss {loss:.4f}")
    module.eval()
    tuned = replace_initializers(model, module.state_arrays())
    return tuned, {"loss": history, "seconds": time.perf_counter() - t0, "check_diff": diff}
