"""LLM controllers: per-sequence wasm guests that write token masks and logit biases in place.

* :class:`TokenTable`: a tokenizer's exact token bytes in one sealed region shared by all
  controllers of that tokenizer;
* :class:`Controller`: a controller module and its argument;
* :class:`ControllerBatch`: the controllers of one decode batch, stepped in parallel
  (threads or worker processes), writing straight into the batch bitmask / bias tensors;
* :mod:`constraints`: JSON Schema, regex, Lark grammar and choice constraints (llguidance),
  which a batch runs on the host next to wasm controllers, masks written in place.

The controller ABI is ``wasmshare_controller.h``, documented in ``docs/controller-abi.md``.
torch is needed only by :meth:`ControllerBatch.apply` and the tensor views; ``tokenizers``
only by :meth:`TokenTable.from_tokenizer` / :meth:`TokenTable.from_file`.
"""

from __future__ import annotations

from ..errors import BatchFull, ConstraintError, ModelError, SequenceFailed, TokenizerError
from . import constraints
from .batch import ControllerBatch
from .constraints import ConstraintSpec
from .controller import Controller
from .limits import Limits
from .models import MODEL_NAMES, LoadedModel, load_model
from .results import Action, BatchStep, Output, RowOutput, StepResult
from .tokens import TokenTable

__all__ = [
    "Action",
    "BatchFull",
    "BatchStep",
    "ConstraintError",
    "ConstraintSpec",
    "Controller",
    "Limits",
    "LoadedModel",
    "MODEL_NAMES",
    "ModelError",
    "ControllerBatch",
    "Output",
    "RowOutput",
    "SequenceFailed",
    "StepResult",
    "TokenTable",
    "TokenizerError",
    "constraints",
    "load_model",
]
