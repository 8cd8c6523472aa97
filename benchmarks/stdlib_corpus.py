"""A second evaluation corpus: the docstrings of a few standard-library modules, as pydoc renders them.

One document per public function or class of each module in `MODULES` (source
``py:<module>.<name>``, title the same), its text ``pydoc.render_doc(obj, renderer=plaintext)``
with the pydoc header line dropped; a class's document holds its methods. The text depends on the
Python version, which the corpus records.
"""

from __future__ import annotations

import importlib
import inspect
import pydoc
import re
import sys
from typing import Any

#: The modules indexed: everyday modules whose docstrings answer everyday questions.
MODULES = (
    "json",
    "os.path",
    "shutil",
    "re",
    "itertools",
    "functools",
    "collections",
    "random",
    "math",
    "statistics",
    "textwrap",
    "heapq",
    "bisect",
    "csv",
    "tempfile",
    "glob",
    "copy",
    "base64",
    "subprocess",
)
SOURCE_PREFIX = "py:"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def public_members(module: Any) -> list[tuple[str, Any]]:
    """The module's public functions and classes that it defines or exports (``__all__``), by name."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name in dir(module) if not name.startswith("_")]
    members = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if obj is None or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if inspect.isclass(obj) and issubclass(obj, BaseException) and not (obj.__doc__ or "").strip():
            continue
        members.append((name, obj))
    return members


def stdlib_documents() -> list[Any]:
    """One `Document` per public function or class of `MODULES`."""
    from gpurag.rag.types import Document

    documents = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, obj in public_members(module):
            qualified = f"{module_name}.{name}"
            text = pydoc.render_doc(obj, title="%s", renderer=pydoc.plaintext)
            text = "\n".join(text.splitlines()[1:]).strip()  # the first line repeats the title
            text = _ADDRESS.sub("", text)  # "<function copy2 at 0x7f...>": differs between processes
            if text:
                documents.append(
                    Document(text, f"{SOURCE_PREFIX}{qualified}", {"module": module_name, "title": qualified})
                )
    return documents


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))
