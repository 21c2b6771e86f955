"""Plain data across the sandbox boundary: a JSON encoding that decodes only to plain values.

Return values come from the sandbox to the judge as JSON text written by :func:`dump` and read by
:func:`loads`. Reading never runs code and never builds anything but ``None``, ``bool``, ``int``,
``float`` (nan and infinities included), ``complex``, ``str``, ``bytes``, ``list``, ``tuple``,
``set``, ``frozenset`` and ``dict``, nested at most ``MAX_DEPTH`` deep: whatever the sandbox sends,
the judge gets data, not objects with behaviour (no pickle, no ``__eq__`` that always says yes, no
subclasses). JSON arrays are lists; every other container or special value is a one-key object
(``{"tuple": [...]}``, ``{"dict": [[k, v], ...]}``, ``{"float": "nan"}``).

The judge bounds its work on whatever arrives, before doing it, with one :class:`Budget` per
message (``MAX_WORK`` units): every JSON value costs a unit (counted on the text before it is
parsed), and building a set or dict costs the comparisons among members whose hashes collide
(``hash(i * (2**61 - 1)) == 0`` for every int ``i``), each weighted by what comparing those members
may cost: their own size and the comparisons inside them, so sets of sets of colliding values are
charged for what comparing them costs, not for their length. The value, and each list or tuple
directly in it, is charged for the set the trusted tests may make of it (a repeated value counts
once per distinct value of its hash).
The charge is made before the set is built; past the budget, :class:`WireTooLarge`.

Messages are length-prefixed (4 bytes, big-endian). The judge's messages to the sandbox (call
arguments from the trusted tests) are ``marshal`` data, which only the sandbox reads; the sandbox's
messages to the judge are JSON objects (:func:`message`, read with :func:`unpack`).

This module's text is also run inside the sandbox, so the part the sandbox uses (:func:`dump`,
:func:`message`) needs no module beyond ``math`` and the C ``_json`` string escaper: the sandbox
starts faster without ``json``, ``re`` and ``enum``.
"""

from __future__ import annotations

import math

MAX_DEPTH = 100
MAX_MESSAGE = 16 * 1024 * 1024
# The judge's work on one message, in values parsed plus element comparisons to build its sets and
# dicts: bounds its memory and time (about 1 s of decoding, at most about 0.3 s in one C call).
MAX_WORK = 1_000_000
HEADER_SIZE = 4
_INT_BITS = 4000  # larger ints travel as hex: int(str) is capped at 4300 digits

try:
    from _json import encode_basestring_ascii as _quote
except ImportError:  # an interpreter without the C accelerator
    from json.encoder import py_encode_basestring_ascii as _quote


class WireError(ValueError):
    """A value that cannot be sent, or a message that is not valid plain data."""


class WireTooLarge(WireError):
    """A message or value that would cost the judge more than its budget to decode."""


def _float(value: float) -> str:
    if math.isfinite(value):
        return float.__repr__(value)
    name = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f'{{"float":"{name}"}}'


def _dump(value: object, out: list, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise WireError("nested too deeply")
    kind = type(value)
    if value is None:
        out.append("null")
    elif kind is bool:
        out.append("true" if value else "false")
    elif kind is str:
        out.append(_quote(value))
    elif kind is int:
        if value.bit_length() <= _INT_BITS:
            out.append(int.__repr__(value))
        else:
            out.append(f'{{"int":"{hex(value)}"}}')
    elif kind is float:
        out.append(_float(value))
    elif kind in (list, tuple, set, frozenset):
        if kind is not list:
            out.append(f'{{"{kind.__name__}":')
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _dump(item, out, depth + 1)
        out.append("]" if kind is list else "]}")
    elif kind is dict:
        out.append('{"dict":[')
        for i, (key, item) in enumerate(value.items()):
            out.append(",[" if i else "[")
            _dump(key, out, depth + 1)
            out.append(",")
            _dump(item, out, depth + 1)
            out.append("]")
        out.append("]}")
    elif kind is bytes:
        out.append(f'{{"bytes":"{value.hex()}"}}')
    elif kind is complex:
        out.append(f'{{"complex":[{_float(value.real)},{_float(value.imag)}]}}')
    else:
        raise WireError(f"a {kind.__name__} object is not plain data")


def dump(value: object) -> str:
    """``value`` as JSON text; WireError for anything but the plain types (exact types:
    subclasses are refused) or nesting deeper than MAX_DEPTH."""
    out: list[str] = []
    _dump(value, out, 0)
    return "".join(out)


def frame(body: bytes) -> bytes:
    if len(body) > MAX_MESSAGE:
        raise WireError(f"a message of {len(body)} bytes is larger than {MAX_MESSAGE}")
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def message(**fields: object) -> bytes:
    """One framed JSON object whose field values are written by :func:`dump`."""
    parts = [f"{_quote(name)}:{dump(value)}" for name, value in fields.items()]
    return frame(("{" + ",".join(parts) + "}").encode("utf-8", "surrogatepass"))


def size_of(header: bytes) -> int:
    return int.from_bytes(header, "big")


# -- the judge's side ---------------------------------------------------------------------------

_SCALARS = frozenset({bool, int, float, str})
_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _decode_float(data: object) -> float:
    if type(data) is float:
        return data
    if type(data) is int:
        return float(data)
    if type(data) is dict and len(data) == 1 and data.get("float") in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[data["float"]]
    raise WireError("bad float")


class Budget:
    """The judge's work left for one message: charged before each piece of work is done, so no
    value, however nested, costs more than ``MAX_WORK`` in all."""

    def __init__(self, units: int = MAX_WORK) -> None:
        self.units, self.left = units, units

    def spend(self, units: int, what: str) -> None:
        if units > self.left:
            raise WireTooLarge(f"{what}, more than the {self.units} a message may cost")
        self.left -= units


# A long int or string compares digit by digit (two equal-hash ints of 60,000 bits: about 60 times
# the cost of comparing two small ones): each 1 KiB of it costs one more comparison.
_BYTES_PER_COST = 10  # log2(1024)


def _scalar_cost(value: object) -> int:
    kind = type(value)
    if kind is int:
        return 1 + (value.bit_length() >> (_BYTES_PER_COST + 3))
    if kind is str:
        return 1 + (len(value) >> _BYTES_PER_COST)
    return 1


def decode(data: object, budget: Budget | None = None) -> object:
    """The plain value that ``data`` (parsed JSON) encodes; WireError if it is not valid,
    WireTooLarge if building its sets and dicts would cost more than ``budget`` has left."""
    return _decode(data, 0, budget or Budget())[0]


def _decode(data: object, depth: int, budget: Budget) -> tuple[object, int]:
    """The value and its cost: an upper bound on the element comparisons that comparing it with
    another value may take (its size, plus the comparisons that looking up its members take)."""
    if depth > MAX_DEPTH:
        raise WireError("nested too deeply")
    kind = type(data)
    if data is None or kind in _SCALARS:
        return data, _scalar_cost(data)
    if kind is list:
        costs = []
        items, cost = _decode_items(data, depth, budget, costs)
        if depth <= _SET_DEPTH:
            _charge_as_set(items, costs, budget)
        return items, cost
    if kind is not dict or len(data) != 1:
        raise WireError("bad value")
    ((tag, body),) = data.items()
    try:
        if tag in ("tuple", "set", "frozenset") and type(body) is list:
            costs = []
            items, cost = _decode_items(body, depth, budget, costs)
            if tag == "tuple":
                if depth <= _SET_DEPTH:
                    _charge_as_set(items, costs, budget)
            else:
                cost += _charge_hashes(items, costs, budget)
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items), cost
        if tag == "dict" and type(body) is list:
            pairs, key_costs, cost = [], [], 1
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise WireError("bad dict item")
                (key, key_cost), (item, item_cost) = (_decode(p, depth + 1, budget) for p in pair)
                pairs.append((key, item))
                key_costs.append(key_cost)
                cost += key_cost + item_cost
            cost += _charge_hashes([key for key, _ in pairs], key_costs, budget)
            return dict(pairs), cost
        if tag == "float":
            return _decode_float(data), 1
        if tag == "int" and type(body) is str:
            value = int(body, 16)
            return value, _scalar_cost(value)
        if tag == "bytes" and type(body) is str:
            value = bytes.fromhex(body)
            return value, 1 + (len(value) >> _BYTES_PER_COST)
        if tag == "complex" and type(body) is list and len(body) == 2:
            return complex(_decode_float(body[0]), _decode_float(body[1])), 1
    except WireError:
        raise
    except (TypeError, ValueError) as exc:  # unhashable set member or dict key, bad hex
        raise WireError(f"bad {tag}: {exc}") from None
    raise WireError(f"bad value tagged {tag!r}")


def _decode_items(
    data: list, depth: int, budget: Budget, costs: list[int] | None = None
) -> tuple[list, int]:
    """The decoded items and their total cost; each item's cost is appended to ``costs``."""
    items: list = []
    total = 1
    for item in data:
        if item is None or type(item) in _SCALARS:  # most items: no call
            items.append(item)
            cost = _scalar_cost(item)
        else:
            value, cost = _decode(item, depth + 1, budget)
            items.append(value)
        total += cost
        if costs is not None:
            costs.append(cost)
    return items, total


def _charge_hashes(members: list, costs: list[int], budget: Budget) -> int:
    """Charge ``budget``, before a set or dict of ``members`` is built, for the comparisons that
    building it takes: each member is compared with every earlier one of the same hash, each
    comparison costing up to the larger member's cost. Returns twice that work: what looking up
    every member of one such set in another may take (so a set of such sets is charged for it).
    Counting hashes is linear."""
    hashes = list(map(hash, members))  # TypeError for an unhashable member
    if len(set(hashes)) == len(hashes):  # distinct hashes (ints hash to themselves): no work
        return 0
    groups: dict[int, list[int]] = {}
    for key, cost in zip(hashes, costs, strict=True):
        group = groups.setdefault(key, [0, 0])
        group[0] += 1
        group[1] = max(group[1], cost)
    work = sum(n * (n - 1) // 2 * cost for n, cost in groups.values())
    budget.spend(
        work,
        f"a set or dict of {len(members)} members whose hashes collide "
        f"(about {work} comparisons to build it)",
    )
    return 2 * work


# Members whose hash the sender can choose (an int's is the int mod 2**61 - 1; a tuple's and a
# frozenset's combine their members'): a set built from them can be made to collide. A str's and a
# bytes' hash is keyed (SipHash) and cannot be chosen; None's is fixed.
_CHOSEN_HASH = frozenset({bool, int, float, complex, tuple, frozenset})
# The lists and tuples charged for the set the tests may make of them: the value itself and those
# directly in it (`set(f())`, `set(f()[0])`, a dict's values). Deeper ones are not: hashing their
# tuple members at every level would walk them once per level.
_SET_DEPTH = 1


def _charge_as_set(items: list, costs: list[int], budget: Budget) -> None:
    """Charge ``budget`` for what making a set or dict of a list's or tuple's ``items`` would
    take: the trusted tests may (``set(result)``, ``Counter(result)``, ``x in set(result)``), in
    one C call that no deadline interrupts. As `_charge_hashes`, except that a member equal to an
    earlier one costs one comparison per distinct value of its hash, not one per member (honest
    lists repeat values): n members of one hash with d distinct values cost about n * d. The
    common case, members of distinct hashes, takes C calls only."""
    if len(items) < 2 or not _CHOSEN_HASH.intersection(map(type, items)):
        return
    try:
        if len(set(map(hash, items))) == len(items):  # no two members share a hash
            return
    except TypeError:  # a tuple holding a list or dict (skipped below: no set can hold it)
        pass
    from collections import Counter  # the judge's side only

    objects = dict(zip(map(id, items), items, strict=True))  # a repeat of one object: found by `is`
    cost_of = dict(zip(map(id, items), costs, strict=True))
    count_of = Counter(map(id, items))
    groups: dict[int, list[int]] = {}
    for key, item in objects.items():
        try:
            groups.setdefault(hash(item), []).append(key)
        except TypeError:
            continue
    work = 0
    for keys in groups.values():
        if len(keys) == 1:  # one object, repeated: each repeat is found by identity
            continue
        budget.spend(sum(cost_of[k] for k in keys), "telling colliding members apart")
        distinct = len({dump(objects[k]) for k in keys})  # equal values have equal text
        n = sum(count_of[k] for k in keys)
        work += (n * distinct - distinct * (distinct + 1) // 2) * max(cost_of[k] for k in keys)
    budget.spend(
        work,
        f"a list or tuple of {len(items)} members whose hashes collide "
        f"(about {work} comparisons to make a set of it)",
    )


_MARKS = (b"[", b"{", b",", b":")
# A JSON string, its closing quote optional (what follows an unclosed one is never parsed);
# possessive, so matching keeps no backtracking state: linear time and constant memory even for
# 16 MB of backslashes in one string (the backtracking form took 13 s and 940 MB).
_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?'


def count_values(body: bytes, limit: int = MAX_WORK) -> int:
    """An upper bound on the JSON values in ``body`` without parsing it, exact enough to decide
    whether there are more than ``limit``: every value but the first follows a ``[``, ``{``, ``,``
    or ``:`` outside a string. Marks inside strings are only told apart (one scan over the
    strings) when the plain count of marks is over ``limit``; that scan stops once it passes
    ``limit``. Linear time, constant memory (no copy of ``body``)."""
    count = 1 + sum(map(body.count, _MARKS))
    if count <= limit:
        return count
    import re  # the judge's side only

    count, start = 1, 0
    # each string is a value: at most ``limit`` of them in a message that fits
    for strings, match in enumerate(re.finditer(_STRING, body, re.DOTALL), 1):
        count += sum(body.count(mark, start, match.start()) for mark in _MARKS)
        if count > limit or strings > limit:
            return max(count, strings)
        start = match.end()
    return count + sum(body.count(mark, start) for mark in _MARKS)


def _no_constants(name: str) -> object:
    raise WireError(f"bare {name} is not valid here")


def unpack(body: bytes, budget: Budget | None = None) -> dict:
    """The JSON object of one message body; WireError if it is not one, WireTooLarge if its values
    (counted before it is parsed) are more than ``budget`` has left."""
    import json  # the judge's side only

    budget = budget or Budget()
    values = count_values(body, budget.left)
    budget.spend(values, f"a message of more than {budget.left} values (counted on its text)")
    try:
        parsed = json.loads(body.decode("utf-8", "surrogatepass"), parse_constant=_no_constants)
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise WireError(f"not a JSON message: {exc}") from None
    if type(parsed) is not dict:
        raise WireError("a message must be a JSON object")
    return parsed


def loads(text: str | bytes) -> object:
    """The plain value of JSON text written by :func:`dump`."""
    body = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    budget = Budget()
    return decode(unpack(b'{"v":' + body + b"}", budget)["v"], budget)
