"""Write the two Python-derived texts of the bundled corpus from the running CPython.

    python scripts/snapshot_python_texts.py [--out tensornet_llm/helpers/texts]

* ``python_docs.txt``: the reference documentation that ships with CPython as
  ``pydoc_data.topics`` (what ``help("topic")`` prints), every topic in name order, each headed
  ``== name ==``;
* ``python_code.txt``: the source of a fixed list of pure-Python standard-library modules, each
  headed ``# ==== module ====``.

A snapshot rather than reading the interpreter at run time, so that calibration and evaluation
are the same on every Python version. Both are under the PSF License (see the texts' README).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import platform
from pathlib import Path

#: Standard-library modules whose source forms the code domain, in this order. The corpus
#: splits the file between fitting and held-out text at a module boundary (helpers/data.py).
MODULES = (
    "argparse", "textwrap", "difflib", "statistics", "fractions", "heapq", "bisect",
    "configparser", "csv", "calendar", "string", "shlex", "glob", "fnmatch", "pprint",
    "dataclasses", "enum", "functools", "contextlib", "copy", "queue", "sched", "graphlib",
    "json.decoder", "json.encoder", "html.parser", "email.utils", "urllib.parse",
    # held out (the last quarter or so of the file)
    "pathlib", "tarfile", "ipaddress", "zipfile", "gettext", "cmd", "tokenize",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "tensornet_llm" / "helpers"
                        / "texts")
    args = parser.parse_args()
    import pydoc_data.topics as topics

    docs = "\n\n".join(f"== {name} ==\n\n{topics.topics[name].strip()}"
                       for name in sorted(topics.topics))
    (args.out / "python_docs.txt").write_text(docs + "\n", encoding="utf-8")
    code = "\n\n".join(f"# ==== {name} ====\n\n{inspect.getsource(importlib.import_module(name))}"
                       for name in MODULES)
    (args.out / "python_code.txt").write_text(code + "\n", encoding="utf-8")
    print(f"wrote {args.out} from Python {platform.python_version()}")


if __name__ == "__main__":
    main()
