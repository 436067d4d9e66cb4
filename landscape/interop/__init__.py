"""Quantized checkpoints of the field's tools as :class:`~landscape.quant.result.QuantResult` displacements.

:func:`import_checkpoint` turns a quantized model saved by another tool into a result against its full-
precision base, so ``compare``, ``radius``, ``scan --kind displacement`` and the figures measure it like one
of ours (``landscape import BASE CHECKPOINT --out R``):

* GPTQ-packed checkpoints (``quantization_config.quant_method: gptq``, v1 and v2 zero conventions), read by
  :mod:`landscape.interop.gptq_packed`;
* GGUF files, dequantized through transformers' ``gguf_file`` loader, their tensor types read from the file
  (:mod:`landscape.interop.gguf_file`);
* compressed-tensors checkpoints (``quant_method: compressed-tensors``, integer weights), dequantized by the
  compressed-tensors library as transformers loads them.

:func:`landscape.interop.export.export_compressed_tensors` goes the other way (``landscape export``).

The checkpoint must come from the base it is imported against (and, for a GGUF, be of its architecture): its
full-precision tensors (embeddings, norms, biases) must equal the base's, and every dequantized weight must
point the way of the base's w0 (:data:`MIN_COSINE`); otherwise it is refused naming both fingerprints. The
lattice the checkpoint used is recorded (``extra["checkpoint_grid"]``); when its weights lie on the grid of
one of our formats on w0 the result states that format, else it has none and its label says "off our grid".
"""

from landscape.interop.importing import MIN_COSINE, import_checkpoint, read_checkpoint_kind

__all__ = ["MIN_COSINE", "import_checkpoint", "read_checkpoint_kind"]
