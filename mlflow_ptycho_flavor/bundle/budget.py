"""Bounded work on untrusted pickles and the plain data decoded from them (docs/bundle-format.md §5).

A pickle of a few hundred bytes can stand for far more than it holds: shared sub-objects referenced over and over
("billion laughs": ``[v, v]`` nested 40 times is 2**40 items), tuples nested a million deep, or containers whose
instance state hides what they contain from a walker that calls their methods. Whoever touches such a value later
(``hash``, ``==``, ``repr``, a YAML dump) never finishes or crashes the interpreter. Three checks keep every use
bounded by the member's real size:

* :func:`scan_pickle_structure` runs *before* any unpickler: it follows the opcodes on an abstract stack and
  refuses tuples nested deeper than :data:`MAX_DEPTH` (hashing one recurses in C and overflows the stack) and
  pickles whose dict keys and set elements would cost more than the budget to hash (a shared-tuple key is hashed
  without memoisation, so 40 levels of sharing mean 2**40 steps inside the unpickler itself), and memo indices or
  counted arguments for which the C unpickler would allocate more than the data holds;
* :func:`check_plain_data` walks the decoded value once, through the builtin types' own methods (never an
  instance's), refusing deep nesting, instance state on containers, and a total *expanded size* over the budget,
  where a node weighs one plus its payload (string, bytes, array, tensor, int) in 8-byte units, so that a large
  leaf shared a million times costs what a million copies would;
* :func:`plain_differences` / :func:`plain_equal` compare two decoded values under an explicit budget.

The budget of a member of ``size`` bytes is :func:`node_budget` (``10 * size + 10_000``): legitimate members use a
small fraction of it.
"""

from __future__ import annotations

import itertools
import pickle
import pickletools
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mlflow_ptycho_flavor.errors import CorruptBundleError, UnsafeBundleError, short_error, short_repr

__all__ = [
    "MAX_DEPTH",
    "node_budget",
    "REFERENCING_OPCODES",
    "iter_opcodes",
    "walk_opcodes",
    "scan_pickle_structure",
    "check_plain_data",
    "plain_equal",
    "plain_differences",
]

#: Deepest container nesting a decoded member may have (real manifests/params/metadata nest 3 levels at most).
MAX_DEPTH = 64

_CONTAINERS = (dict, list, tuple, set, frozenset)


def node_budget(size: int) -> int:
    """Work allowed on a member of ``size`` bytes, in weighted nodes (see :func:`payload_weight`)."""
    return 10 * int(size) + 10_000


def payload_weight(item: Any) -> int:
    """What one node costs whoever copies, hashes, compares or prints it: 1 plus its payload in 8-byte units."""
    if isinstance(item, (str, bytes, bytearray)):
        return 1 + len(item) // 8
    if isinstance(item, int):
        return 1 + item.bit_length() // 64
    nbytes = getattr(item, "nbytes", None)  # numpy arrays and scalars, torch tensors (expanded views in full)
    return 1 + nbytes // 8 if isinstance(nbytes, int) and nbytes > 0 else 1


# ----------------------------------------------------------------------------------------------------------------
# Before unpickling: a walk over the opcodes, then an abstract run of them
# ----------------------------------------------------------------------------------------------------------------
# How each opcode's argument is laid out, from pickletools' own descriptors: no argument, a fixed-size number, a
# counted payload (the count's width and signedness), or text up to a newline (one line; GLOBAL and INST: two).
_NO_ARG, _FIXED, _COUNTED, _LINE, _TWO_LINES = range(5)
_FIXED_FORMATS = {"uint1": "<B", "uint2": "<H", "int4": "<i", "uint4": "<I", "uint8": "<Q", "float8": ">d"}
_COUNT_FORMATS = {
    "long1": "<B", "string1": "<B", "bytes1": "<B", "unicodestring1": "<B",
    "long4": "<i", "string4": "<i", "bytes4": "<I", "unicodestring4": "<I",
    "bytes8": "<Q", "bytearray8": "<Q", "unicodestring8": "<Q",
}
#: Text arguments decoded to ``str`` up to this many bytes (dict keys, global names); longer ones are weighed only.
_DECODED_TEXT_BYTES = 800


def _opcode_table() -> list[tuple[str, int, Any, str, int] | None]:
    """Per opcode byte: ``(name, argument kind, struct of the number, argument name, that struct's size)``."""
    table: list[tuple[str, int, Any, str, int] | None] = [None] * 256
    for op in pickletools.opcodes:
        arg = op.arg
        if arg is None:
            entry = (op.name, _NO_ARG, None, "", 0)
        elif arg.name in _FIXED_FORMATS or arg.name in _COUNT_FORMATS:
            kind, formats = (_FIXED, _FIXED_FORMATS) if arg.name in _FIXED_FORMATS else (_COUNTED, _COUNT_FORMATS)
            layout = struct.Struct(formats[arg.name])
            entry = (op.name, kind, layout, arg.name, layout.size)
        else:  # the text forms of protocol 0
            entry = (op.name, _TWO_LINES if arg.name == "stringnl_noescape_pair" else _LINE, None, arg.name, 0)
        table[ord(op.code)] = entry
    return table


_OPCODES = _opcode_table()
_STOP = ord(pickle.STOP)


def _decode_argument(data: bytes, view: memoryview, pos: int, entry: tuple[str, int, Any, str, int], at: int
                     ) -> tuple[Any, int]:
    """The argument of the opcode ``entry`` at byte ``at``, starting at ``pos``, and where the next opcode starts.

    Numbers as ``int``/``float``, short text as ``str``, ``GLOBAL``/``INST`` as ``"module name"``, and payloads as
    zero-copy ``memoryview`` slices. A count that runs past the end of the data is an error here, never an
    allocation.

    Raises:
        ValueError: a truncated argument.
    """
    name, kind, layout, arg_name, size = entry
    end = len(data)
    if kind == _NO_ARG:
        return None, pos
    if kind == _FIXED:
        if pos + size > end:
            raise ValueError(f"{name} at byte {at} is cut short")
        return layout.unpack_from(data, pos)[0], pos + size
    if kind == _COUNTED:
        if pos + size > end:
            raise ValueError(f"{name} at byte {at} is cut short")
        count = layout.unpack_from(data, pos)[0]
        pos += size
        if count < 0 or count > end - pos:
            raise ValueError(f"expected {count} bytes in a {arg_name} at byte {at}, but only {end - pos} remain")
        payload = view[pos : pos + count]
        if arg_name.startswith("long"):
            return int.from_bytes(payload, "little", signed=True), pos + count
        if arg_name.startswith("unicode") and count <= _DECODED_TEXT_BYTES:
            return str(payload, "utf-8", "surrogatepass"), pos + count
        return payload, pos + count
    lines = []
    for _ in range(2 if kind == _TWO_LINES else 1):
        newline = data.find(b"\n", pos)
        if newline < 0:
            raise ValueError(f"{name} at byte {at} has no end of line")
        lines.append(view[pos:newline])
        pos = newline + 1
    if kind == _TWO_LINES:
        return " ".join(str(line, "utf-8", "replace") for line in lines), pos
    if arg_name == "decimalnl_short" and name in ("GET", "PUT"):
        return int(bytes(lines[0])), pos  # a memo index
    if len(lines[0]) <= _DECODED_TEXT_BYTES:
        return str(lines[0], "utf-8", "replace"), pos
    return lines[0], pos


def walk_opcodes(
    data: bytes, actions: Mapping[str, Callable[[str, Any], None]], default: Callable[[str, Any], None]
) -> None:
    """Call ``actions[name](name, arg)`` (``default`` for names it lacks) for each opcode of the pickle in ``data``,
    up to ``STOP``, without building anything.

    The opcodes and arguments :func:`pickletools.genops` yields, with arguments in the form :class:`_Machine`
    weighs them (:func:`_decode_argument`). :func:`scan_pickle_structure` does not go through here: it decodes the
    frequent opcodes inline (:meth:`_Machine.run`) and the others with the same :func:`_decode_argument`.

    Raises:
        ValueError: an unknown opcode, a truncated argument, or no ``STOP``.
    """
    view = memoryview(data)
    end = len(data)
    pos = 0
    while pos < end:
        at = pos
        entry = _OPCODES[data[pos]]
        if entry is None:
            raise ValueError(f"unknown opcode {data[pos]:#04x} at byte {pos}")
        arg, pos = _decode_argument(data, view, pos + 1, entry, at)
        actions.get(entry[0], default)(entry[0], arg)
        if data[at] == _STOP:
            return
    raise ValueError("pickle exhausted before seeing STOP")


def iter_opcodes(data: bytes) -> Iterator[tuple[str, Any]]:
    """``(opcode name, argument)`` for each opcode of the pickle in ``data`` up to ``STOP`` (:func:`walk_opcodes`'s
    walk, collected; a malformed stream raises here, before anything is yielded)."""
    found: list[tuple[str, Any]] = []
    walk_opcodes(data, {}, lambda name, arg: found.append((name, arg)))
    return iter(found)


# ----------------------------------------------------------------------------------------------------------------
# The abstract run
# ----------------------------------------------------------------------------------------------------------------
class _Node:
    """Abstract stack value: expanded size (``weight``, saturating), tuple ``depth``, and whether it is mutable
    (lists, dicts, sets grow after they are referenced; hashing one fails at once)."""

    __slots__ = ("weight", "depth", "mutable", "children", "name")

    def __init__(self, weight: int, depth: int = 0, mutable: bool = False, children: tuple = (), name: str = ""):
        self.weight = weight
        self.depth = depth
        self.mutable = mutable
        self.children = children
        self.name = name


#: Globals whose call hashes every element of its argument (py2 names as torch.save writes them included).
_HASHING_CALLS = {
    "builtins set", "builtins frozenset", "__builtin__ set", "__builtin__ frozenset",
    "collections OrderedDict",
}
_ATOM_OPS = {
    "INT", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "UNICODE", "BINUNICODE8", "FLOAT", "PERSID",
}  # SHORT_BINUNICODE and BINUNICODE: decoded inline by _Machine.run
#: Atoms that weigh 1 whatever their argument: buffers and extension codes (EXT*: refused by a screen, weighed like
#: a global otherwise); the ints of at most 32 bits, floats, None and booleans are decoded inline (_UNIT_WIDTHS).
_UNIT_OPS = {"NEXT_BUFFER", "EXT1", "EXT2", "EXT4"}


class _Machine:
    """The pickle virtual machine's stack discipline (as in ``pickle._Unpickler``) over :class:`_Node` values."""

    def __init__(self, member: str, budget: int, size: int) -> None:
        self.member = member
        self.budget = budget
        self.size = size
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.hashing = 0
        self.unit = _Node(1)

    # stack helpers -------------------------------------------------------------------------------------------
    def pop(self) -> Any:
        if not self.stack:
            raise self._underflow()
        return self.stack.pop()

    def _underflow(self) -> CorruptBundleError:
        return CorruptBundleError(f"{self.member} is not a valid pickle: stack underflow")

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise CorruptBundleError(f"{self.member} is not a valid pickle: no MARK on the stack")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def node(self, value: Any) -> _Node:
        if not isinstance(value, _Node):
            raise CorruptBundleError(f"{self.member} is not a valid pickle: an opcode finds no value to work on")
        return value

    def weigh(self, *parts: int) -> int:
        return min(sum(parts), self.budget + 1)  # saturating: 2**(10**6) is as refused as budget + 1

    def immutable(self, children: list[Any]) -> _Node:
        nodes = tuple(children)
        depth, weight = 0, 1
        for child in nodes:  # every stack value is a _Node (pop and pop_mark only ever return those)
            if child.depth > depth:
                depth = child.depth
            weight += child.weight
        depth += 1
        if depth > MAX_DEPTH:
            raise UnsafeBundleError(
                f"{self.member} nests tuples more than {MAX_DEPTH} levels deep (hashing them would overflow the "
                "interpreter's stack); refused before unpickling"
            )
        return _Node(min(weight, self.budget + 1), depth, False, nodes)

    def hashed(self, *values: Any) -> None:
        """Dict keys / set elements: each is hashed (and compared on collisions) at its full expanded size."""
        for value in values:
            self.hashing = self.weigh(self.hashing, self.current_weight(self.node(value)))
        if self.hashing > self.budget:
            raise UnsafeBundleError(
                f"{self.member} uses dict keys or set elements that expand to more than {self.budget} objects "
                "(shared tuples referenced over and over: a 'billion laughs' pickle); hashing them would never "
                "finish, so it is refused before unpickling"
            )

    def current_weight(self, node: _Node) -> int:
        # A tuple's weight was fixed when it was built, but a list inside it may have grown since.
        if node.mutable or not node.children:
            return node.weight
        return self.weigh(1, *(child.weight for child in node.children))

    def grow(self, target: Any, *values: Any) -> None:
        node = self.node(target)
        node.weight = self.weigh(node.weight, *(self.node(v).weight for v in values))

    # the whole pickle ----------------------------------------------------------------------------------------
    def run(self, data: bytes, screen: Callable[[str, Any], None] | None = None) -> None:
        """Apply each opcode of the pickle in ``data`` to the abstract stack, up to ``STOP``.

        One loop on every load's path (the weights' ``data.pkl`` alone has ~2,600 opcodes): the opcodes plain data
        and ``torch.save`` write most (small ints, memo puts and gets, text, marks, tuples, calls, dict items) are
        decoded inline and applied there or handed to their handler directly; the others are decoded by
        :func:`_decode_argument` and dispatched through :data:`_STEPS`, after ``screen(name, arg)`` for those of
        :data:`REFERENCING_OPCODES`.

        Raises:
            ValueError: an unknown opcode, a truncated argument, or no ``STOP`` (the caller words it).
        """
        view = memoryview(data)
        end = len(data)
        unit, memo, metastack, immutable = self.unit, self.memo, self.metastack, self.immutable
        stack = self.stack
        pos = 0
        while pos < end:
            at = pos
            code = data[pos]
            pos += 1
            width = _UNIT_WIDTHS[code]
            if width >= 0:  # small ints, floats, None, booleans: the shared weight-1 node
                pos += width
                if pos > end:
                    raise ValueError(f"{_OPCODES[code][0]} at byte {at} is cut short")
                stack.append(unit)
                continue
            width = _MEMO_INDEX_WIDTHS[code]
            if width:  # BINPUT, LONG_BINPUT, BINGET, LONG_BINGET
                if pos + width > end:
                    raise ValueError(f"{_OPCODES[code][0]} at byte {at} is cut short")
                index = data[pos] if width == 1 else _UINT4.unpack_from(data, pos)[0]
                pos += width
                if code == _BINGET or code == _LONG_BINGET:
                    self._get("BINGET", index)
                else:
                    self._put("BINPUT", index)
            elif code == _SHORT_BINUNICODE or code == _BINUNICODE:
                if code == _SHORT_BINUNICODE:
                    count = data[pos] if pos < end else -1
                    pos += 1
                else:
                    count = _UINT4.unpack_from(data, pos)[0] if pos + 4 <= end else -1
                    pos += 4
                if count < 0:
                    raise ValueError(f"{_OPCODES[code][0]} at byte {at} is cut short")
                if count > end - pos:
                    raise ValueError(f"expected {count} bytes in a {_OPCODES[code][3]} at byte {at}, but only "
                                     f"{end - pos} remain")
                payload = view[pos : pos + count]  # decoded as _decode_argument does
                self._atom("BINUNICODE", str(payload, "utf-8", "surrogatepass") if count <= _DECODED_TEXT_BYTES
                           else payload)
                pos += count
            elif code == _MARK:
                metastack.append(stack)
                stack = self.stack = []
            elif code == _TUPLE:
                items = self.pop_mark()
                stack = self.stack
                stack.append(immutable(items))
            elif code in _SMALL_TUPLES:
                count = _SMALL_TUPLES[code]
                if len(stack) < count:
                    raise self._underflow()
                items = stack[-count:]
                del stack[-count:]
                stack.append(immutable(items))
            elif code == _EMPTY_TUPLE:
                stack.append(immutable([]))
            elif code == _EMPTY_DICT or code == _EMPTY_LIST:
                stack.append(_Node(1, 1, True))
            elif code == _REDUCE:
                if len(stack) < 2:
                    raise self._underflow()
                args = stack.pop()
                stack.append(self.call(stack.pop(), [args]))
            elif code == _SETITEM:
                if len(stack) < 2:
                    raise self._underflow()
                value = stack.pop()
                key = stack.pop()
                self.hashed(key)
                self.grow(stack[-1] if stack else None, key, value)
            elif code == _BINPERSID:
                if not stack:
                    raise self._underflow()
                stack.append(_Node(self.node(stack.pop()).weight))
            elif code == _MEMOIZE:
                if not stack:
                    raise self._underflow()
                memo[len(memo)] = stack[-1]
            elif code == _STOP:
                return
            else:
                entry = _OPCODES[code]
                if entry is None:
                    raise ValueError(f"unknown opcode {code:#04x} at byte {at}")
                arg, pos = _decode_argument(data, view, pos, entry, at)
                name = entry[0]
                if screen is not None and name in REFERENCING_OPCODES:
                    screen(name, arg)
                handler = _STEPS.get(name)
                if handler is not None:
                    handler(self, name, arg)
                    stack = self.stack  # MARK-consuming handlers put the stack below the mark back
                elif name not in ("PROTO", "FRAME"):
                    raise CorruptBundleError(f"{self.member} uses the unknown pickle opcode {name}")
        raise ValueError("pickle exhausted before seeing STOP")

    def _unit_atom(self, name: str, arg: Any) -> None:
        # buffers and extension codes here, small ints, floats, None and booleans in run(): one shared weight-1 node
        # per run (atoms are never grown; a malformed pickle that grows one only makes every atom weigh more)
        self.stack.append(self.unit)

    def _atom(self, name: str, arg: Any) -> None:
        kind = type(arg)
        if kind is str:
            # short strings keep their text: STACK_GLOBAL names its global with the two strings before it
            node = _Node(min(1 + len(arg) // 8, self.budget + 1), name=arg if len(arg) <= 200 else "")
        elif kind is int:
            node = _Node(min(1 + arg.bit_length() // 64, self.budget + 1))
        elif arg is None or kind is float:
            node = _Node(1)
        else:  # payloads (memoryview slices) and anything else
            node = _Node(self.weigh(payload_weight(arg)))
        self.stack.append(node)

    def _empty_container(self, name: str, arg: Any) -> None:
        self.stack.append(_Node(1, 1, True))

    def _frozenset(self, name: str, arg: Any) -> None:
        items = self.pop_mark()
        self.hashed(*items)
        self.stack.append(self.immutable(items))

    def _list(self, name: str, arg: Any) -> None:
        items = self.pop_mark()
        self.stack.append(_Node(self.weigh(1, *(self.node(i).weight for i in items)), 1, True))

    def _dict(self, name: str, arg: Any) -> None:
        items = self.pop_mark()
        self.hashed(*items[0::2])
        self.stack.append(_Node(self.weigh(1, *(self.node(i).weight for i in items)), 1, True))

    def _append(self, name: str, arg: Any) -> None:
        value = self.pop()
        self.grow(self.stack[-1] if self.stack else None, value)

    def _appends(self, name: str, arg: Any) -> None:
        items = self.pop_mark()
        self.grow(self.stack[-1] if self.stack else None, *items)

    def _setitems(self, name: str, arg: Any) -> None:
        items = self.pop_mark()
        self.hashed(*items[0::2])
        self.grow(self.stack[-1] if self.stack else None, *items)

    def _additems(self, name: str, arg: Any) -> None:
        items = self.pop_mark()
        self.hashed(*items)
        self.grow(self.stack[-1] if self.stack else None, *items)

    def _pop(self, name: str, arg: Any) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def _pop_mark(self, name: str, arg: Any) -> None:
        self.pop_mark()

    def _dup(self, name: str, arg: Any) -> None:
        self.stack.append(self.stack[-1] if self.stack else self.pop())

    def _get(self, name: str, arg: Any) -> None:  # GET, BINGET, LONG_BINGET (the binary forms decoded in run())
        value = self.memo.get(arg)
        if value is None:
            raise CorruptBundleError(f"{self.member} is not a valid pickle: memo key {arg} was never stored")
        self.stack.append(value)

    def _put(self, name: str, arg: Any) -> None:  # PUT, BINPUT, LONG_BINPUT (the binary forms decoded in run())
        # A pickler numbers its memo entries 0, 1, 2, ... one PUT (at least two bytes) per stored object, so a real
        # index stays below the data's length. The C unpickler grows its memo array to twice the index it is given
        # and clears every slot: one LONG_BINPUT of 2**31 in a ten-byte pickle asks for 32 GiB.
        if not 0 <= arg < self.size:
            raise UnsafeBundleError(
                f"{self.member} stores into pickle memo slot {short_repr(arg)}, past anything its {self.size} bytes "
                "can number (the C unpickler would allocate memory for every slot up to it); refused before "
                "unpickling"
            )
        self.memo[arg] = self.stack[-1] if self.stack else self.pop()

    def _global(self, name: str, arg: Any) -> None:
        self.stack.append(_Node(1, name=str(arg)))

    def _stack_global(self, name: str, arg: Any) -> None:
        qualname, module = self.node(self.pop()), self.node(self.pop())
        self.stack.append(_Node(1, name=f"{module.name} {qualname.name}"))

    def _reduce(self, name: str, arg: Any) -> None:
        args, func = self.pop(), self.pop()
        self.stack.append(self.call(func, [args]))

    def _newobj_ex(self, name: str, arg: Any) -> None:
        kwargs, args, cls = self.pop(), self.pop(), self.pop()
        self.stack.append(self.call(cls, [args, kwargs]))

    def _obj(self, name: str, arg: Any) -> None:
        items = self.pop_mark()
        if not items:
            raise CorruptBundleError(f"{self.member} is not a valid pickle: OBJ without a class")
        self.stack.append(self.call(items[0], items[1:]))

    def _inst(self, name: str, arg: Any) -> None:
        items = self.pop_mark()
        self.stack.append(self.call(_Node(1, name=str(arg)), items))

    def _build(self, name: str, arg: Any) -> None:
        state = self.pop()
        self.hashed(state)  # dict state: every key is set as an attribute
        self.grow(self.stack[-1] if self.stack else None, state)

    def _readonly_buffer(self, name: str, arg: Any) -> None:
        self.node(self.stack[-1] if self.stack else None)

    def call(self, func: Any, args: list[Any]) -> _Node:
        """The result of calling ``func(*args)``: conservatively as costly to hash as its arguments."""
        func = self.node(func)
        if func.name in _HASHING_CALLS:
            self.hashed(*args)
            if func.name.endswith("frozenset"):
                return self.immutable(args)
            return _Node(self.weigh(1, *(self.current_weight(self.node(a)) for a in args)), 1, True)
        return self.immutable(args)


#: Opcode name -> the :class:`_Machine` method applying it, for the opcodes :meth:`_Machine.run` does not apply
#: inline (PROTO and FRAME change nothing).
_STEPS: dict[str, Callable[[_Machine, str, Any], None]] = {
    **dict.fromkeys(_ATOM_OPS, _Machine._atom),
    **dict.fromkeys(_UNIT_OPS, _Machine._unit_atom),
    "EMPTY_SET": _Machine._empty_container,
    "FROZENSET": _Machine._frozenset,
    "LIST": _Machine._list,
    "DICT": _Machine._dict,
    "APPEND": _Machine._append,
    "APPENDS": _Machine._appends,
    "SETITEMS": _Machine._setitems,
    "ADDITEMS": _Machine._additems,
    "POP": _Machine._pop,
    "POP_MARK": _Machine._pop_mark,
    "DUP": _Machine._dup,
    "GET": _Machine._get,  # GET and PUT: also the binary forms, which run() decodes and hands to them
    "PUT": _Machine._put,
    "GLOBAL": _Machine._global,
    "STACK_GLOBAL": _Machine._stack_global,
    "NEWOBJ": _Machine._reduce,
    "NEWOBJ_EX": _Machine._newobj_ex,
    "OBJ": _Machine._obj,
    "INST": _Machine._inst,
    "BUILD": _Machine._build,
    "READONLY_BUFFER": _Machine._readonly_buffer,
}


# What :meth:`_Machine.run` decodes inline, by opcode byte.
def _by_opcode(widths: dict[bytes, int], default: int) -> list[int]:
    table = [default] * 256
    for opcode, width in widths.items():
        table[opcode[0]] = width
    return table


#: Per opcode byte: the argument's width for the atoms of weight 1 (small ints, floats, None, booleans), else -1.
_UNIT_WIDTHS = _by_opcode({pickle.BININT1: 1, pickle.BININT2: 2, pickle.BININT: 4, pickle.BINFLOAT: 8,
                           pickle.NONE: 0, pickle.NEWTRUE: 0, pickle.NEWFALSE: 0}, -1)
#: Per opcode byte: the memo index's width for the binary memo opcodes, else 0.
_MEMO_INDEX_WIDTHS = _by_opcode({pickle.BINPUT: 1, pickle.LONG_BINPUT: 4, pickle.BINGET: 1, pickle.LONG_BINGET: 4}, 0)
_SMALL_TUPLES = {pickle.TUPLE1[0]: 1, pickle.TUPLE2[0]: 2, pickle.TUPLE3[0]: 3}
_BINGET, _LONG_BINGET = pickle.BINGET[0], pickle.LONG_BINGET[0]
_SHORT_BINUNICODE, _BINUNICODE = pickle.SHORT_BINUNICODE[0], pickle.BINUNICODE[0]
_MARK, _TUPLE, _EMPTY_TUPLE, _REDUCE = pickle.MARK[0], pickle.TUPLE[0], pickle.EMPTY_TUPLE[0], pickle.REDUCE[0]
_EMPTY_DICT, _EMPTY_LIST = pickle.EMPTY_DICT[0], pickle.EMPTY_LIST[0]
_SETITEM, _SETITEMS, _BINPERSID, _MEMOIZE = pickle.SETITEM[0], pickle.SETITEMS[0], pickle.BINPERSID[0], pickle.MEMOIZE[0]
_UINT4 = struct.Struct("<I")


#: Opcodes that name code to import or fetch: what a ``screen`` passed to :func:`scan_pickle_structure` is shown.
REFERENCING_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"})


def scan_pickle_structure(
    data: bytes, member: str, *, screen: Callable[[str, Any], None] | None = None
) -> None:
    """Refuse a pickle whose construction alone would never finish or would crash, before any unpickler runs.

    Follows the opcodes on an abstract stack (nothing is built, called or imported): tuples and frozensets nested
    deeper than :data:`MAX_DEPTH` and dict keys / set elements whose total expanded size exceeds
    :func:`node_budget` raise :class:`UnsafeBundleError`; a stream that is not a pickle raises
    :class:`CorruptBundleError`. Counted arguments (``BINBYTES8``, ``BYTEARRAY8``) are checked against the data
    left, never allocated at their declared size (the C unpickler allocates first), and a memo index past the
    data's length (the C unpickler allocates its memo up to twice the index) is refused.

    Args:
        data: the pickle.
        member: its name, for messages.
        screen: called as ``screen(opcode_name, argument)`` for each opcode of :data:`REFERENCING_OPCODES`
            (``GLOBAL``'s argument is ``"module name"``) in the same walk; it raises to refuse the pickle.
    """
    machine = _Machine(member, node_budget(len(data)), len(data))
    try:
        machine.run(data, screen)
    except (UnsafeBundleError, CorruptBundleError):
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed stream (ValueError from the walk, or worse)
        raise CorruptBundleError(f"{member} is not a valid pickle of plain data: {short_error(exc)}") from exc


# ----------------------------------------------------------------------------------------------------------------
# After unpickling: one walk of the decoded value
# ----------------------------------------------------------------------------------------------------------------
#: The one instance attribute a decoded container may carry: the module versions ``nn.Module.state_dict()`` records
#: on the ``OrderedDict`` it returns (``torch.save`` keeps it; checkpoints hold such state_dicts).
_ALLOWED_ATTRIBUTES = frozenset({"_metadata"})


def _children(item: Any, member: str) -> Iterator[Any] | None:
    """The real contents of a container, read through the builtin types' own methods; None for a leaf.

    A pickle can BUILD attributes onto an ``OrderedDict`` (``items``, ``keys``, ``__iter__``...), which would make
    ``item.items()`` show a walker whatever the pickle chose; such instance state is refused, except
    ``_metadata``, whose value is walked like the contents.
    """
    if isinstance(item, _CONTAINERS):
        state = getattr(item, "__dict__", None)  # a data descriptor of the type: the pickle cannot shadow it
        extra: tuple[Any, ...] = ()
        if state:
            foreign = [str(key)[:40] for key in itertools.islice(state, 64) if key not in _ALLOWED_ATTRIBUTES]
            if foreign or len(state) > len(_ALLOWED_ATTRIBUTES):
                article = "an" if type(item).__name__[:1] in "AEIOU" else "a"
                raise UnsafeBundleError(
                    f"{member} holds {article} {type(item).__name__} carrying the instance attributes "
                    f"{short_repr(foreign[:5])}, which plain data never has (they could hide its contents from "
                    "checks); refused"
                )
            extra = tuple(state.values())
        if isinstance(item, dict):
            return itertools.chain(itertools.chain.from_iterable(dict.items(item)), extra)
        if isinstance(item, list):
            return itertools.chain(list.__iter__(item), extra)
        if isinstance(item, tuple):
            return itertools.chain(tuple.__iter__(item), extra)
        members = set.__iter__(item) if isinstance(item, set) else frozenset.__iter__(item)
        return itertools.chain(members, extra)
    if isinstance(item, slice):  # a slice holds three arbitrary objects
        return iter((item.start, item.stop, item.step))
    return None


def check_plain_data(value: Any, *, member: str, size: int, leaf_types: tuple[type, ...] = ()) -> None:
    """Walk a decoded member once and refuse structures that would blow up whoever uses them later.

    Refused (:class:`UnsafeBundleError`): nesting deeper than :data:`MAX_DEPTH`; containers carrying instance
    attributes; and an expanded size over :func:`node_budget` of ``size``, where shared sub-objects count every
    time they are referenced and each node weighs :func:`payload_weight` (a "billion laughs" pickle of a few
    hundred bytes stands for 2**40 list items; a 1 MB string referenced a thousand times stands for 1 GB; ``repr``,
    ``==`` or a YAML dump of either never finishes). The walk is iterative and keeps one iterator per level, so
    neither the stack nor memory grows with the member's width.

    Args:
        value: the decoded object.
        member: the member name, for messages.
        size: the member's size in bytes (sets the budget).
        leaf_types: extra types accepted as leaves without looking inside (e.g. ``torch.Tensor``).
    """
    budget = node_budget(size)
    used = 0
    levels: list[Iterator[Any]] = [iter((value,))]
    done = object()
    while levels:
        item = next(levels[-1], done)
        if item is done:
            levels.pop()
            continue
        used += payload_weight(item)
        if used > budget:
            raise UnsafeBundleError(
                f"{member} expands to more than {budget} objects from {size} bytes (a cycle, or shared sub-objects "
                "referenced over and over: a 'billion laughs' pickle); refused"
            )
        if leaf_types and isinstance(item, leaf_types):
            continue
        children = _children(item, member)
        if children is not None:
            if len(levels) > MAX_DEPTH:
                raise UnsafeBundleError(f"{member} nests containers more than {MAX_DEPTH} levels deep; refused")
            levels.append(children)


# ----------------------------------------------------------------------------------------------------------------
# Comparing two decoded values
# ----------------------------------------------------------------------------------------------------------------
class _Spent(Exception):
    pass


def _equal(a: Any, b: Any, allowance: list[int]) -> bool:
    """Iterative ``a == b`` for plain data charging ``allowance[0]``; raises :class:`_Spent` when it runs out."""
    import numpy as np

    stack = [(a, b, 0)]
    while stack:
        x, y, depth = stack.pop()
        allowance[0] -= payload_weight(x) + payload_weight(y)
        if allowance[0] < 0:
            raise _Spent
        if depth > MAX_DEPTH:
            return False
        if type(x) is not type(y):
            numbers = (int, float, complex)
            if not (isinstance(x, numbers) and isinstance(y, numbers)):
                return False
            try:
                if x != y:
                    return False
            except Exception:  # noqa: BLE001
                return False
            continue
        if isinstance(x, dict):
            allowance[0] -= len(x)  # one lookup per key
            if allowance[0] < 0:
                raise _Spent
            if len(x) != len(y) or any(k not in y for k in dict.keys(x)):
                return False
            stack.extend((value, dict.__getitem__(y, key), depth + 1) for key, value in dict.items(x))
            continue
        if isinstance(x, (list, tuple)):
            if len(x) != len(y):
                return False
            iterate = list.__iter__ if isinstance(x, list) else tuple.__iter__
            stack.extend((p, q, depth + 1) for p, q in zip(iterate(x), iterate(y)))
            continue
        if isinstance(x, slice):
            stack.extend(((x.start, y.start, depth + 1), (x.stop, y.stop, depth + 1), (x.step, y.step, depth + 1)))
            continue
        if isinstance(x, (set, frozenset)):  # elements are hashable, hence flat; set equality hashes each once
            allowance[0] -= len(x) + len(y)
            if allowance[0] < 0:
                raise _Spent
            if x != y:
                return False
            continue
        if isinstance(x, np.ndarray):
            if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
                return False
            continue
        try:
            if not bool(x == y):
                return False
        except Exception:  # noqa: BLE001
            return False
    return True


def _key_text(key: Any) -> str:
    return key[:160] if isinstance(key, str) else short_repr(key)


def plain_differences(a: dict, b: dict, *, budget: int, what: str) -> list[str]:
    """The keys (as text) whose values differ between two decoded dicts, in sorted order, within ``budget``.

    Raises:
        UnsafeBundleError: the comparison would cost more than ``budget`` weighted nodes.
    """
    allowance = [budget - len(a) - len(b)]
    try:
        if allowance[0] < 0:
            raise _Spent
        differing = [_key_text(k) for k in dict.keys(a) if k not in b]
        differing += [_key_text(k) for k in dict.keys(b) if k not in a]
        for key, value in dict.items(a):
            if key in b and not _equal(value, dict.__getitem__(b, key), allowance):
                differing.append(_key_text(key))
    except _Spent:
        raise UnsafeBundleError(
            f"comparing {what} would visit more than {budget} objects; refused (a 'billion laughs' structure?)"
        ) from None
    return sorted(differing)


def plain_equal(a: Any, b: Any, *, budget: int) -> bool:
    """``a == b`` for decoded plain data (numpy arrays element-wise), never raising on odd values and never
    visiting more than ``budget`` weighted nodes.

    Raises:
        UnsafeBundleError: the comparison would cost more than ``budget``.
    """
    try:
        return _equal(a, b, [budget])
    except _Spent:
        raise UnsafeBundleError(
            f"comparing two decoded values would visit more than {budget} objects; refused"
        ) from None
