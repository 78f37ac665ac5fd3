"""kiln: an LLM inference engine that proves what each optimization buys."""

from kiln.lora.request import LoRARequest
from kiln.outputs import CompletionOutput, RequestOutput
from kiln.sampling_params import SamplingParams
from kiln.structured_output.params import StructuredOutputsParams

__all__ = ["LLM", "LoRARequest", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import kiln` stays cheap (no torch import) for the CLI's --help.
    if name == "LLM":
        from kiln.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
