"""tokensel: training framework for learned token selection.

Importing the package registers every selector and Lightning module (so recipes can use short
`class_path` names) and the exported model classes with the transformers Auto classes.
"""

__version__ = "0.1.0"

from tokensel import losses, modules  # noqa: E402,F401
from tokensel.modules import *  # noqa: E402,F401,F403
from tokensel.trainer import *  # noqa: E402,F401,F403
