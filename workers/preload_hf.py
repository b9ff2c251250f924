"""Also preloaded by the fork server when a job's model is a Hugging Face one (see preload.py):
transformers and its common causal-LM modules, ~100 MB a worker would otherwise import alone."""

import gc

import transformers.models.gpt2.modeling_gpt2  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import workers.preload  # noqa: F401

gc.freeze()
