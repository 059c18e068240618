"""The weights of a TorchScript archive (OpenAI's CLIP release files, ``ViT-B-16.pt``), read without TorchScript.

``torch.jit.load`` compiles the archive's code and runs its unpickler with any global the file names; it is
deprecated, and torch says it may break on Python 3.14+. The weights need none of that. An archive is a zip file:
``<top>/data.pkl`` pickles the module tree (each module an object of a class ``__torch__.<path>.<Name>`` whose
attributes are a dict; each tensor a ``torch._utils._rebuild_tensor_v2`` call on a storage named by a persistent id
``("storage", torch.<Type>Storage, key, location, numel)`` whose bytes are the record ``<top>/data/<key>``), and
``<top>/code/__torch__/<path>.py`` holds each class's source, which lists its ``__parameters__`` and
``__buffers__``. This module unpickles ``data.pkl`` with an allow-list of globals (the ``__torch__`` classes become
inert attribute holders; nothing from the file is imported or called) and walks the tree as ``state_dict()`` does:
each module's parameters and buffers, then its submodules, keys joined with dots.
"""

from __future__ import annotations

import ast
import collections
import pickle
import re
import sys
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_SCRIPT_PREFIX = "__torch__"
# a class of the archive's source: `class Name(Module):`, `class Name(NamedTuple):`, or `class Name:` (a plain class)
_CLASS_HEADER = re.compile(r"^class (\w+)(?:\(([\w.]+)\))?:[ \t]*$", re.MULTILINE)
# one line of a class body: `  __parameters__ = ["weight", "bias", ]` (names unescaped: one may hold a ']')
_NAME_LIST = r"^  {}[ \t]*=[ \t]*(\[.*\])[ \t]*$"
# attribute types: `  name : Tensor`, or `  __annotations__["b]y"] = Tensor` for a name that is not an identifier
_ANNOTATION = re.compile(r"^  (\w+) : (.+?)[ \t]*$", re.MULTILINE)
_ANNOTATION_ITEM = re.compile(r'^  __annotations__\["(.*)"\] = (.+?)[ \t]*$', re.MULTILINE)


class TorchScriptArchiveError(ValueError):
    """The file is not a TorchScript archive this reader understands (its message names the file and the reason)."""


class _ScriptObject:
    """An instance of a class of the archive: only its pickled attributes, in their order."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):  # a class with its own __getstate__: its slots are not what was pickled
            raise TorchScriptArchiveError(f"{self.qualified_name} was pickled through its own __getstate__")
        self.attributes = state


class _StorageType:
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None,
                    metadata=None, *rest):
    if metadata or rest:  # math bits (a lazily negated or conjugated view): their values are not the stored ones
        raise TorchScriptArchiveError(f"a tensor with rebuild metadata {metadata!r:.100} {rest!r:.100}")
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _identity_list(values):  # torch.jit._pickle.build_intlist and its kin wrap a plain list
    return list(values)


def _restore_type_tag(value, type_name):  # torch.jit._pickle.restore_type_tag: a typed container, kept as is
    return value


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _identity_list,
    ("torch.jit._pickle", "build_floatlist"): _identity_list,
    ("torch.jit._pickle", "build_doublelist"): _identity_list,
    ("torch.jit._pickle", "build_boollist"): _identity_list,
    ("torch.jit._pickle", "build_tensorlist"): _identity_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, top: str, path: str):
        super().__init__(archive.open(f"{top}/data.pkl"))
        self._archive, self._top, self._path = archive, top, path
        self._classes: Dict[str, type] = {}
        self._storages: Dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module == _SCRIPT_PREFIX or module.startswith(_SCRIPT_PREFIX + "."):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
            return self._classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise TorchScriptArchiveError(f"{self._path}: data.pkl names {module}.{name}, which a weights file does not need")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise TorchScriptArchiveError(f"{self._path}: unknown persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            record = f"{self._top}/data/{key}"
            try:
                raw = self._archive.read(record)
            except KeyError:
                raise TorchScriptArchiveError(f"{self._path}: storage record {record} is missing") from None
            itemsize = storage_type.dtype.itemsize
            if len(raw) != numel * itemsize:
                raise TorchScriptArchiveError(
                    f"{self._path}: storage {record} holds {len(raw)} bytes, {numel} x {storage_type.name} need "
                    f"{numel * itemsize}"
                )
            self._storages[key] = (torch.frombuffer(bytearray(raw), dtype=storage_type.dtype) if numel
                                   else torch.empty(0, dtype=storage_type.dtype))
        return self._storages[key]


def _top_folder(archive: zipfile.ZipFile) -> Optional[str]:
    """The archive's top folder when it holds ``data.pkl`` and ``constants.pkl`` or ``code/`` (TorchScript), or
    ``model.json`` (TorchScript before torch 1.3, which this reader leaves to ``torch.jit.load``), else None."""
    names = set(archive.namelist())
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "model.json":
            return parts[0]
        if len(parts) == 2 and parts[1] == "data.pkl":
            top = parts[0]
            # torch's own test is constants.pkl; code/ is what only torch.jit.save writes beside data.pkl
            if f"{top}/constants.pkl" in names or any(n.startswith(f"{top}/code/") for n in names):
                return top
    return None


def is_torchscript_archive(path: str) -> bool:
    """True for a zip file laid out as ``torch.jit.save`` writes it (``torch.save`` files have no ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return _top_folder(archive) is not None


def _name_list(body: str, field: str, where: str) -> List[str]:
    match = re.search(_NAME_LIST.format(field), body, re.MULTILINE)
    if match is None:  # torch <= 1.5 printed no __buffers__: jit.load's own reading of such files is the reference
        raise TorchScriptArchiveError(f"{where} has no {field} line")
    try:
        names = ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        raise TorchScriptArchiveError(f"{where}: cannot read its {field} line {match.group(1)[:200]!r}") from None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise TorchScriptArchiveError(f"{where}: {field} is not a list of names")
    return names


def _class_lists(archive: zipfile.ZipFile, top: str, qualified: str, path: str) -> Optional[Tuple[List[str], List[str]]]:
    """The names ``state_dict()`` takes from an instance of class ``qualified``: its ``__parameters__`` and those of
    its ``__buffers__`` declared ``Tensor`` (TorchScript's buffer policy skips ``Optional[Tensor]`` ones), read from
    the class's source; None for a class that is not a module."""
    module, _, name = qualified.rpartition(".")
    record = f"{top}/code/{module.replace('.', '/')}.py"
    try:
        source = archive.read(record).decode("utf-8")
    except KeyError:
        raise TorchScriptArchiveError(f"{path}: no source {record} for class {qualified}") from None
    headers = list(_CLASS_HEADER.finditer(source))
    for i, header in enumerate(headers):
        if header.group(1) != name:
            continue
        if header.group(2) != "Module":
            return None
        body = source[header.end(): headers[i + 1].start() if i + 1 < len(headers) else len(source)]
        where = f"{path}: class {qualified} in {record}"
        if re.search(r"^  def __(get|set)state__\(", body, re.MULTILINE):
            raise TorchScriptArchiveError(f"{where} defines its own __getstate__/__setstate__")
        declared = {**dict(_ANNOTATION.findall(body)), **dict(_ANNOTATION_ITEM.findall(body))}
        buffers = [b for b in _name_list(body, "__buffers__", where) if declared.get(b) == "Tensor"]
        return _name_list(body, "__parameters__", where), buffers
    raise TorchScriptArchiveError(f"{path}: class {name} not found in {record}")


def read_torchscript_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """``torch.jit.load(path).state_dict()`` without TorchScript: every parameter and buffer of the archive's module
    tree under its dotted name, in the stored dtype (on the CPU). Raises :class:`TorchScriptArchiveError` for a file
    this reader cannot take."""
    if not zipfile.is_zipfile(path):
        raise TorchScriptArchiveError(f"{path}: not a zip file, so not a TorchScript archive")
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_state_dict(archive, path)
    except TorchScriptArchiveError as exc:
        if str(exc).startswith(path):
            raise
        raise TorchScriptArchiveError(f"{path}: {exc}") from exc
    except Exception as exc:  # a damaged archive (zip, pickle, source text) or a crafted one (a module cycle)
        raise TorchScriptArchiveError(f"{path}: could not be read: {type(exc).__name__}: {exc}") from exc


def _read_state_dict(archive: zipfile.ZipFile, path: str) -> Dict[str, torch.Tensor]:
    top = _top_folder(archive)
    if top is None:
        raise TorchScriptArchiveError(f"{path}: no <folder>/data.pkl beside constants.pkl or code/: not TorchScript")
    if f"{top}/model.json" in archive.namelist():
        raise TorchScriptArchiveError(f"{path}: a TorchScript archive of torch <= 1.2 (model.json)")
    if f"{top}/byteorder" in archive.namelist():
        order = archive.read(f"{top}/byteorder").decode().strip()
        if order != sys.byteorder:
            raise TorchScriptArchiveError(f"{path}: stored {order}-endian, this machine is {sys.byteorder}-endian")
    root = _ArchiveUnpickler(archive, top, path).load()
    if not isinstance(root, _ScriptObject):
        raise TorchScriptArchiveError(f"{path}: data.pkl holds a {type(root).__name__}, not a module")

    state: Dict[str, torch.Tensor] = {}
    known: Dict[str, Optional[Tuple[List[str], List[str]]]] = {}

    def module_lists(obj: _ScriptObject):
        if obj.qualified_name not in known:
            known[obj.qualified_name] = _class_lists(archive, top, obj.qualified_name, path)
        return known[obj.qualified_name]

    def visit(obj: _ScriptObject, prefix: str, ancestors: frozenset) -> None:
        # a module shared under two names is listed under both (as state_dict does); one inside itself is not a tree
        if id(obj) in ancestors:
            raise TorchScriptArchiveError(f"{path}: module {prefix.rstrip('.')} contains itself")
        parameters, buffers = module_lists(obj)
        attributes = getattr(obj, "attributes", {})
        for name in parameters + buffers:
            value = attributes.get(name)
            if isinstance(value, torch.Tensor):  # an absent optional one (a bias=False Linear) is None
                state[prefix + name] = value
        for name, value in attributes.items():
            if isinstance(value, _ScriptObject) and module_lists(value) is not None:
                visit(value, f"{prefix}{name}.", ancestors | {id(obj)})

    if module_lists(root) is None:
        raise TorchScriptArchiveError(f"{path}: the archive's root {root.qualified_name} is not a module")
    visit(root, "", frozenset())
    return state
