"""The generation backends behind ``zephyr_lit.generation.Backend``, each built from a config's ``_target_``.

- ``HFBackend``: any transformers causal LM (hub name, local folder, or a GGUF file) with the model's
  OWN chat template, through ``generation.generate_with_model`` (left padding, batches, a seed each).
- ``OpenAIBackend`` (``openai_backend.py``): any OpenAI-compatible chat-completions endpoint.
- ``VLLMBackend``: vLLM's offline engine, tensor parallel over the GPUs of one node (GPU only).
- ``ScriptedBackend`` and ``RuleJudge`` (``scripted.py``): deterministic, for the embedded default.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import torch

from zephyr_lit.errors import ConfigError
from zephyr_lit.generation import ChatRequest, Reply, generate_with_model
from zephyr_lit.models import DTYPES

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class HFBackend:
    """A transformers causal LM, loaded on first use. ``gguf_file`` names a GGUF file inside
    ``name_or_path`` (transformers dequantises it). The tokenizer keeps its own chat template;
    ``chat_template`` replaces it only when given (a model without one needs it)."""

    def __init__(
        self,
        name_or_path: str,
        gguf_file: str | None = None,
        revision: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 8,
        attn_implementation: str = "sdpa",
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        name: str | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"backend dtype={dtype!r}: use one of {', '.join(DTYPES)}")
        self.name_or_path, self.gguf_file, self.revision = name_or_path, gguf_file, revision
        self.dtype, self.device, self.batch_size = dtype, device, batch_size
        self.attn_implementation, self.chat_template = attn_implementation, chat_template
        self.trust_remote_code = trust_remote_code
        self.name = name or (gguf_file or str(name_or_path)).rstrip("/").split("/")[-1]
        self.model = self.tokenizer = None

    def load(self) -> None:
        """Load the tokenizer (own template, left padding, pad = eos when it has none) and the model."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        if self.gguf_file:
            where["gguf_file"] = self.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, **where)
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        if not tokenizer.chat_template:
            raise ConfigError(f"{self.name_or_path}: the tokenizer has no chat template; set the backend's chat_template")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(
            self.name_or_path, dtype=DTYPES[self.dtype], attn_implementation=self.attn_implementation, **where
        )
        self.model = model.to(pick_device(self.device)).eval()
        self.tokenizer = tokenizer
        log.info("loaded %s on %s", self.name, self.model.device)

    def generate(self, requests: Sequence[ChatRequest]) -> list[Reply]:
        if self.model is None:
            self.load()
        return generate_with_model(self.model, self.tokenizer, requests, self.batch_size)


class VLLMBackend:
    """vLLM's offline ``LLM`` engine (``pip install vllm``, GPU only), loaded on first use.
    ``tensor_parallel_size`` splits the model over that many GPUs; ``engine`` passes any other
    ``LLM(...)`` argument. Each request keeps its own seed (``SamplingParams.seed``)."""

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        engine: dict | None = None,
        name: str | None = None,
    ) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("the vllm backend needs vLLM on a GPU machine: pip install vllm "
                              "(or serve the model with `vllm serve` and use the openai backend)")
        self.model, self.name = model, name or model.rstrip("/").split("/")[-1]
        self.engine_args = {"model": model, "tensor_parallel_size": tensor_parallel_size, "dtype": dtype,
                            "gpu_memory_utilization": gpu_memory_utilization, **(engine or {})}
        if max_model_len is not None:
            self.engine_args["max_model_len"] = max_model_len
        self.llm = None

    def generate(self, requests: Sequence[ChatRequest]) -> list[Reply]:
        from vllm import LLM, SamplingParams

        if self.llm is None:
            self.llm = LLM(**self.engine_args)
        params = [
            SamplingParams(temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                           max_tokens=r.sampling.max_new_tokens, seed=r.seed)
            for r in requests
        ]
        outputs = self.llm.chat([list(r.messages) for r in requests], sampling_params=params, use_tqdm=False)
        replies = []
        for output in outputs:
            first = output.outputs[0]
            replies.append(Reply(first.text, "length" if first.finish_reason == "length" else "stop"))
        return replies
