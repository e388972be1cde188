"""jstate: TensorFlow 1's variables, initialization, placement and Saver, for functional JAX."""

from . import initializers as initializers
from . import transforms as transforms
from .checkpoint.lookup import latest_checkpoint as latest_checkpoint
from .checkpoint.lookup import list_checkpoints as list_checkpoints
from .checkpoint.lookup import list_variables as list_variables
from .checkpoint.lookup import load_variable as load_variable
from .checkpoint.lookup import open_checkpoint as open_checkpoint
from .checkpoint.preemption import Preemption as Preemption
from .checkpoint.saver import Saver as Saver
from .core.errors import ArgumentError as ArgumentError
from .core.errors import CheckpointError as CheckpointError
from .core.errors import CheckpointNotFoundError as CheckpointNotFoundError
from .core.errors import CorruptCheckpointError as CorruptCheckpointError
from .core.errors import InitializerError as InitializerError
from .core.errors import InvalidNameError as InvalidNameError
from .core.errors import JStateError as JStateError
from .core.errors import MappingError as MappingError
from .core.errors import ModelError as ModelError
from .core.errors import PlacementError as PlacementError
from .core.errors import SpecMismatchError as SpecMismatchError
from .core.errors import StoreError as StoreError
from .core.errors import StoreTimeoutError as StoreTimeoutError
from .core.errors import UninitializedError as UninitializedError
from .core.errors import UnknownVariableError as UnknownVariableError
from .core.table import Table as Table
from .core.tree import to_nnx as to_nnx
from .formats.base import Checkpoint as Checkpoint
from .formats.safetensors import save_safetensors as save_safetensors
from .model.balance import round_robin as round_robin
from .model.flax import flax_model as flax_model
from .model.init import abstract as abstract
from .model.init import explain_placement as explain_placement
from .model.init import init as init
from .model.placement import Origin as Origin
from .model.placement import Placement as Placement
from .model.scope import Scope as Scope
from .model.sharding import shardings as shardings
from .model.spec import VariableSpec as VariableSpec
from .model.state import State as State
from .model.state import from_nnx as from_nnx
from .model.state import report_uninitialized as report_uninitialized

# Every public name, as the API reference (docs/api/) groups them; tests/docs/test_docs_site.py
# checks that the two agree.
__all__ = [
    # Models and State (docs/api/model.rst)
    "Scope",
    "State",
    "VariableSpec",
    "flax_model",
    "to_nnx",
    "from_nnx",
    # Init and placement (docs/api/init.rst)
    "init",
    "abstract",
    "report_uninitialized",
    "shardings",
    "explain_placement",
    "round_robin",
    "Placement",
    "Origin",
    # Initializers (docs/api/initializers.rst)
    "initializers",
    # Saver and checkpoints (docs/api/checkpoints.rst)
    "Saver",
    "Preemption",
    "latest_checkpoint",
    "list_checkpoints",
    "list_variables",
    "load_variable",
    "open_checkpoint",
    "save_safetensors",
    "Table",
    # Transforms (docs/api/transforms.rst)
    "transforms",
    # Formats (docs/api/formats.rst)
    "Checkpoint",
    # Object storage (docs/api/storage.rst)
    "StoreError",
    "StoreTimeoutError",
    # Errors (docs/api/errors.rst)
    "JStateError",
    "ArgumentError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "SpecMismatchError",
    "MappingError",
    "UninitializedError",
    "UnknownVariableError",
    "InvalidNameError",
    "InitializerError",
    "ModelError",
    "PlacementError",
]

__version__ = "0.1.0"
