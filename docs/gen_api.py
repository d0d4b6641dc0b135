"""Write docs/api.md, the API reference, from the package's docstrings.

    python docs/gen_api.py          # regenerate
    python docs/gen_api.py --check  # exit 1 if docs/api.md is out of date (run by the tests)

Every name in each module's ``__all__`` gets its signature and docstring; classes also list
the public methods and properties they define themselves.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

API = Path(__file__).with_name("api.md")
#: Rooms in reading order (the model-level API first, the pure functions last) and each room's
#: modules in reading order.
ROOMS = {
    "compress": ["compactify", "config", "plan", "surgery", "stream", "groups", "sweeps", "mpo_sweeps", "report", "budget", "slim", "calibrate", "fit",
                 "targets", "sensitivity",
                 "entanglement", "profiling", "plots"],
    "train": ["heal", "token_loss", "quantize", "quantize_selection", "lora"],
    "saving": ["serialization", "structure", "transformers_plugin", "tensors", "legacy"],
    "layers": ["mpo", "ttns", "low_rank", "maxvol", "cross_layer", "gated_mlp", "shared_rows", "base", "layout", "quantized", "autotune", "factorize",
               "decompose", "tree", "contract"],
    "helpers": ["data", "start_token", "generated", "evaluate", "speed", "models", "files",
                "progress"],
}
MODULES = [f"{room}.{name}" for room, names in ROOMS.items() for name in names] + [
    "errors", "cli", "cli_options"]


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""


def _body(doc: str) -> list[str]:
    """The summary paragraph as text, the rest (Args, Returns, shapes) verbatim."""
    if not doc:
        return []
    head, _, rest = doc.partition("\n\n")
    out = [head.replace("\n", " "), ""]
    return out + (["```text", rest, "```", ""] if rest.strip() else [])


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return name
    return f"{name}{sig}".replace("'", "")


def _value(obj) -> str:
    """A constant's repr; paths inside the checkout are shown relative to it (the page must not
    depend on where the repository was cloned)."""
    if isinstance(obj, Path):
        import tensornet_llm

        root = Path(tensornet_llm.__file__).resolve().parent.parent
        try:
            return f"<checkout>/{obj.resolve().relative_to(root).as_posix()}"
        except ValueError:
            return repr(obj)
    return repr(obj)


def _members(cls) -> list[tuple[str, object]]:
    out = []
    for attr, value in vars(cls).items():
        if attr.startswith("_") or attr in getattr(cls, "__dataclass_fields__", {}):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            out.append((attr, value))
    return out


def render() -> str:
    import tensornet_llm

    lines = ["# API reference", "",
             "Generated from the docstrings by `docs/gen_api.py` (the tests check it is current). "
             "`import tensornet_llm` exposes: " + ", ".join(f"`{n}`" for n in tensornet_llm.__all__)
             + ".", ""]
    lines += ["Rooms, from the top down (docs/architecture.md says what each may import): "
              + ", ".join(f"[`{room}`](#room-{room})" for room in ROOMS) + ", and the command "
              "line.", ""]
    for short in MODULES:
        room = short.partition(".")[0] if "." in short else None
        if room and short == f"{room}.{ROOMS[room][0]}":
            package = importlib.import_module(f"tensornet_llm.{room}")
            lines += [f'<a id="room-{room}"></a>', "", f"# Room `tensornet_llm.{room}`", "",
                      _doc(package).replace("\n", " "), ""]
        module = importlib.import_module(f"tensornet_llm.{short}")
        lines += [f"## `tensornet_llm.{short}`", "", _doc(module).split("\n\n")[0], ""]
        for name in module.__all__:
            obj = getattr(module, name)
            obj = getattr(obj, "__wrapped__", obj)  # lru_cache-wrapped functions
            if inspect.isclass(obj) or inspect.isfunction(obj):
                kind = "class" if inspect.isclass(obj) else "function"
                lines += [f"### `{name}`", "", "```python", f"{kind} " + _signature(name, obj)
                          .replace("tensornet_llm.", ""), "```", ""]
                lines += _body(_doc(obj))
                if inspect.isclass(obj):
                    for attr, member in _members(obj):
                        target = member.fget if isinstance(member, property) else member
                        first = _doc(target).split("\n\n")[0].replace("\n", " ")
                        label = attr if isinstance(member, property) else _signature(attr, member)
                        lines.append(f"- `{label}`" + (f": {first}" if first else ""))
                    lines.append("")
            else:
                lines += [f"### `{name}`", "", f"`{name} = {_value(obj)}`"[:300], ""]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not API.is_file() or API.read_text() != text:
            print("docs/api.md is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    API.write_text(text)
    print(f"wrote {API}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
