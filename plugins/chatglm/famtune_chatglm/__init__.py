"""famtune family plugin for ChatGLM3-6B (``chatglm3``) and GLM-4-9B-chat (``glm4``).

Both families ship remote code (``model_type: chatglm``). This plugin never runs it: checkpoints
are mapped onto transformers' native ``GlmForCausalLM`` and the tokenizers are rebuilt from the
original vocabulary files with ``sentencepiece`` (ChatGLM3) or ``tiktoken`` (GLM-4).
"""

from __future__ import annotations

__version__ = "0.1.0"
