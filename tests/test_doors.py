"""Only the trust layer (src/cifarkit/core/untrusted/) reads bytes this process did not write: the source is
walked for every way Python, torch, numpy, Pillow, ONNX, Optuna, safetensors and YAML open such bytes, so a new
door cannot be added past the guard; docs/trust.md's inventory names every reader the layer has."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"
LAYER = SRC / "cifarkit" / "core" / "untrusted"
TRUST_DOC = ROOT / "docs" / "trust.md"

# (the object's name as written, the attribute called): torch.load, json.loads, Image.open, OmegaConf.load...
CALLS = {
    ("torch", "load"),
    ("jit", "load"),
    ("json", "load"),
    ("json", "loads"),
    ("np", "load"),
    ("numpy", "load"),
    ("np", "fromfile"),
    ("np", "loadtxt"),
    ("np", "genfromtxt"),
    ("Image", "open"),
    ("onnx", "load"),
    ("onnx", "load_model"),
    ("OmegaConf", "load"),
    ("yaml", "load"),
    ("yaml", "safe_load"),
    ("yaml", "full_load"),
    ("yaml", "unsafe_load"),
    ("yaml", "parse"),
    ("optuna", "load_study"),
    ("zipfile", "ZipFile"),
    ("tarfile", "open"),
}
# Names that open outside bytes whatever they are reached through.
NAMES = {
    "InferenceSession",
    "RDBStorage",
    "JournalStorage",
    "JournalFileBackend",
    "JournalFileStorage",
    "JournalRedisBackend",
    "JournalRedisStorage",
    "safe_open",
    "load_file",
    "load_state_dict_from_url",
    "Unpickler",
}
MODULES = {"pickle", "dill", "joblib", "marshal", "shelve"}  # any import of these is a door


def doors(source: str) -> list[tuple[int, str]]:
    """Every line of ``source`` that opens outside bytes: a call or an import the layer alone may use."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value if isinstance(func, ast.Attribute) else None
            owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name in NAMES or (owner_name, name) in CALLS:
                found.append((node.lineno, f"{owner_name + '.' if owner_name else ''}{name}(...)"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            top, last = node.module.split(".")[0], node.module.split(".")[-1]
            for alias in node.names:
                if top in MODULES or alias.name in NAMES or (last, alias.name) in CALLS:
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    return found


def readers() -> dict[str, list[str]]:
    """The trust layer's functions and methods that open outside bytes (``untrusted.module.function``,
    ``untrusted.module.Class.method``), with the calls that do."""
    out: dict[str, list[str]] = {}
    for path in sorted(LAYER.glob("*.py")):
        tree = ast.parse(path.read_text())
        functions = [(n.name, n) for n in tree.body if isinstance(n, ast.FunctionDef)]
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            functions += [(f"{cls.name}.{n.name}", n) for n in cls.body if isinstance(n, ast.FunctionDef)]
        for name, fn in functions:
            calls = [what for _, what in doors(ast.unparse(fn)) if what.endswith("(...)")]
            if calls:
                out[f"untrusted.{path.stem}.{name}"] = calls
    return out


def test_the_walker_finds_every_kind_of_door() -> None:
    """The rule's own check: each way of opening bytes, written as code would write it, is found."""
    source = "\n".join(
        [
            "import pickle",
            "from json import loads",
            "from safetensors.torch import load_file",
            "x = torch.load(p, weights_only=True)",
            "y = json.loads(text)",
            "im = Image.open(f)",
            "s = ort.InferenceSession(path)",
            "st = optuna.storages.RDBStorage(url)",
            "c = OmegaConf.load(p)",
            "a = np.load(p)",
        ]
    )
    assert [line for line, _ in doors(source)] == list(range(1, 11))
    assert doors("x = torch.save(m, p)\ny = json.dumps(d)\nim = Image.new('RGB', (1, 1))") == []


def test_only_the_trust_layer_opens_outside_bytes() -> None:
    outside = []
    for path in sorted(SRC.rglob("*.py")):
        if LAYER in path.parents:
            continue
        outside += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in doors(path.read_text())]
    assert outside == [], "open these through src/cifarkit/core/untrusted/ (docs/trust.md):\n" + "\n".join(outside)


def test_the_inventory_names_every_reader_of_the_layer() -> None:
    """docs/trust.md's table under "Every door" lists every reader of the layer (``untrusted.module.function``),
    and names nothing the layer does not define."""
    text = TRUST_DOC.read_text()
    table = text[text.index("## Every door") :]
    table = table[: table.find("\n## ", 1)] if "\n## " in table[1:] else table
    listed = set(re.findall(r"`(untrusted\.[\w.]+)`", table))
    found = readers()
    assert sorted(set(found) - listed) == [], "readers missing from docs/trust.md's inventory"
    defined = {f"untrusted.{p.stem}.{n}" for p in LAYER.glob("*.py") for n in _defined(p)}
    assert sorted(listed - defined) == [], "docs/trust.md names readers the trust layer does not have"


def _defined(path: Path) -> list[str]:
    """The functions, classes and methods a module of the layer defines, as ``name`` or ``Class.method``."""
    tree = ast.parse(path.read_text())
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        names += [f"{cls.name}.{n.name}" for n in cls.body if isinstance(n, ast.FunctionDef)]
    return names
