"""jstate: TensorFlow 1's variables, initialization, placement and Saver, for functional JAX."""

from . import initializers as initializers
from . import transforms as transforms
from ._balance import round_robin as round_robin
from ._checkpoint import latest_checkpoint as latest_checkpoint
from ._checkpoint import list_checkpoints as list_checkpoints
from ._checkpoint import list_variables as list_variables
from ._checkpoint import load_variable as load_variable
from ._checkpoint import open_checkpoint as open_checkpoint
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointNotFoundError as CheckpointNotFoundError
from ._errors import CorruptCheckpointError as CorruptCheckpointError
from ._errors import InitializerError as InitializerError
from ._errors import InvalidNameError as InvalidNameError
from ._errors import JStateError as JStateError
from ._errors import MappingError as MappingError
from ._errors import ModelError as ModelError
from ._errors import PlacementError as PlacementError
from ._errors import SpecMismatchError as SpecMismatchError
from ._errors import StoreError as StoreError
from ._errors import StoreTimeoutError as StoreTimeoutError
from ._errors import UninitializedError as UninitializedError
from ._errors import UnknownVariableError as UnknownVariableError
from ._flax import flax_model as flax_model
from ._init import abstract as abstract
from ._init import explain_placement as explain_placement
from ._init import init as init
from ._placement import Origin as Origin
from ._placement import Placement as Placement
from ._reader import Checkpoint as Checkpoint
from ._saver import Saver as Saver
from ._saver import save_safetensors as save_safetensors
from ._scope import Scope as Scope
from ._sharding import shardings as shardings
from ._spec import VariableSpec as VariableSpec
from ._state import State as State
from ._state import from_nnx as from_nnx
from ._state import report_uninitialized as report_uninitialized
from ._state import to_nnx as to_nnx
from ._table import Table as Table

__version__ = "0.1.0"
