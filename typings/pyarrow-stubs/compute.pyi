# pyarrow.compute creates its functions at import time from Arrow's function registry, so they
# exist in no source file pyright could read; every name there is typed Any instead of unknown.
from typing import Any

def __getattr__(name: str) -> Any: ...
