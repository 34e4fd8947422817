"""Model pools: where the base, the K experts and the K task heads come from, loaded into a
:class:`LoadedPool` (encoder, task vectors, heads). Checkpoint files of any ``nn.Module``
(:class:`CheckpointPool`), open_clip CLIP with cached zero-shot heads (:class:`OpenCLIPPool`),
Hugging Face causal / seq2seq LMs and sequence classifiers with LoRA or full experts
(:class:`HFLanguageModelPool`, :class:`HFSequenceClassifierPool`, optional ``[llm]`` extra), and the conversion of CLIP checkpoint layouts (open_clip, Hugging Face, task-vectors pickles).

May import: :mod:`adamerge.engine`, :mod:`adamerge.data` (task registry, preprocessing),
:mod:`adamerge.io`, :mod:`adamerge.errors`.
"""

from .clip import OpenCLIPPool, ZeroShotHead
from .hf import (FirstTokenSeq2Seq, HFCausalLMPool, HFLanguageModelPool, HFSequenceClassifierPool, LastTokenFeatures,
                 LastTokenLM, VerbaliserHead)
from .layout import Layout, infer_layout
from .pool import CheckpointPool, LoadedPool, ModelPool, PreloadedPool

__all__ = ["CheckpointPool", "FirstTokenSeq2Seq", "HFCausalLMPool", "HFLanguageModelPool", "HFSequenceClassifierPool",
           "LastTokenFeatures", "LastTokenLM", "Layout", "LoadedPool", "ModelPool", "OpenCLIPPool",
           "PreloadedPool", "VerbaliserHead", "ZeroShotHead", "infer_layout"]
