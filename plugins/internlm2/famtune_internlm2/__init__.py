"""famtune family plugin for InternLM2 and InternLM2.5 chat models.

Original checkpoints (``InternLM2ForCausalLM`` with ``auto_map`` and fused ``wqkv``) load as
transformers' native ``LlamaForCausalLM`` and their SentencePiece tokenizer as a native fast
tokenizer; no remote code ever runs. Modules: ``plugin`` (registration), ``family`` (the family),
``template`` (chat format, labels), ``convert`` (layouts), ``tokenizer``, ``tiny``.
"""

from __future__ import annotations

__version__ = "0.1.0"
