"""Quality harness: perplexity / embedding cosine of plain and NWC folders, with fixed, documented protocols.

* :mod:`nwcfmt.eval.loading`: a plain HF or NWC folder -> fp32 CPU model + tokenizer;
* :mod:`nwcfmt.eval.perplexity`: causal-LM perplexity (protocol ``nwc-ppl-v1``);
* :mod:`nwcfmt.eval.similarity`: encoder sentence-embedding cosine against the original (``nwc-cos-v1``);
* :mod:`nwcfmt.eval.fakequant`: the reference RTN fake quantization quantizing codecs are checked against;
* :mod:`nwcfmt.eval.report`: ``nwc eval``'s evaluation records, table, plot and ``nwc_eval.json``.

``transformers`` is imported only when a function needs it.
"""

from __future__ import annotations

from nwcfmt.eval.fakequant import fake_quantize, fake_quantize_linear_weights, quantizable_linears
from nwcfmt.eval.loading import EvalModel, load_for_eval
from nwcfmt.eval.perplexity import PerplexityResult, perplexity, tokenize_text
from nwcfmt.eval.report import EvalRecord, evaluate_folder, format_table, plot_records, save_eval_json
from nwcfmt.eval.similarity import SimilarityResult, embedding_similarity, sentence_embeddings, split_sentences

__all__ = [
    "EvalModel",
    "EvalRecord",
    "PerplexityResult",
    "SimilarityResult",
    "embedding_similarity",
    "evaluate_folder",
    "fake_quantize",
    "fake_quantize_linear_weights",
    "format_table",
    "load_for_eval",
    "perplexity",
    "plot_records",
    "quantizable_linears",
    "save_eval_json",
    "sentence_embeddings",
    "split_sentences",
    "tokenize_text",
]
