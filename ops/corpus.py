"""The embedded default corpus: docstrings of the Python standard library.

Real English technical text present on every machine with Python, no download. One document per
documented module, class and function, id = dotted qualified name (``json.dumps``), in sorted
order so every machine builds the same corpus from the same Python version.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import inspect
import io
import contextlib
import sys
import warnings
from typing import Iterator

# Modules with side effects on import (open windows, print, start things) or that are
# platform-specific / deprecated noise.
_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
    "venv", "pydoc_data", "msvcrt", "winreg", "winsound", "nt", "xxsubtype", "xxlimited", "xxlimited_35",
    "sre_compile", "sre_constants", "sre_parse", "distutils", "msilib", "crypt", "nis", "spwd", "ossaudiodev",
}
MIN_DOC_CHARS = 80


def _modules() -> list[str]:
    """Top-level stdlib modules and the public submodules of stdlib packages, sorted."""
    names = []
    for top in sorted(getattr(sys, "stdlib_module_names", ())):
        if top in _SKIP or top.startswith("_"):
            continue
        names.append(top)
        spec = importlib.util.find_spec(top) if top not in sys.builtin_module_names else None
        if spec and spec.submodule_search_locations:
            names += sorted(f"{top}.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)
                            if not m.name.startswith("_") and m.name not in _SKIP and "test" not in m.name)
    return names


def _public_members(module) -> Iterator[tuple[str, object]]:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in sorted(set(names)):
        try:
            obj = getattr(module, name)
        except Exception:  # noqa: BLE001 - any attribute error means "not documentable"
            continue
        if (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)) and \
                getattr(obj, "__module__", None) == module.__name__:
            yield name, obj


def stdlib_documents(max_docs: int | None = None) -> list[dict]:
    """Collect ``{"id", "text", "source"}`` documents from stdlib docstrings.

    Args:
        max_docs: stop after this many documents (None: all, a few thousand).
    """
    docs: list[dict] = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for mod_name in _modules():
            try:
                module = importlib.import_module(mod_name)
            except Exception:  # noqa: BLE001 - unavailable on this platform/build
                continue
            entries = [(mod_name, module)] + [(f"{mod_name}.{n}", o) for n, o in _public_members(module)]
            for qualname, obj in entries:
                doc = inspect.getdoc(obj)
                if not doc or len(doc) < MIN_DOC_CHARS:
                    continue
                kind = "module" if obj is module else ("class" if inspect.isclass(obj) else "function")
                header = f"{qualname} ({kind})" if obj is module else _signature_header(qualname, obj)
                docs.append({"id": qualname, "text": f"{header}\n\n{doc.strip()}", "source": f"stdlib:{mod_name}"})
                if max_docs and len(docs) >= max_docs:
                    return docs
    return docs


def _signature_header(qualname: str, obj: object) -> str:
    try:
        return f"{qualname}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return qualname
