"""jstate: TensorFlow 1's variables, initialization, placement and Saver, for functional JAX."""

from . import initializers as initializers
from ._errors import InitializerError as InitializerError
from ._errors import InvalidNameError as InvalidNameError
from ._errors import JStateError as JStateError
from ._errors import ModelError as ModelError
from ._errors import PlacementError as PlacementError
from ._errors import SpecMismatchError as SpecMismatchError
from ._errors import UninitializedError as UninitializedError
from ._errors import UnknownVariableError as UnknownVariableError
from ._init import abstract as abstract
from ._init import explain_placement as explain_placement
from ._init import init as init
from ._scope import Scope as Scope
from ._spec import Placement as Placement
from ._spec import VariableSpec as VariableSpec
from ._state import State as State
from ._state import report_uninitialized as report_uninitialized
from ._table import Table as Table

__version__ = "0.1.0"
