"""wire — the message types shared by trainer, server and browser (DESIGN §5).

Owns: the schema version, the documented limits, the names of commands and
statuses, strict JSON encoding (non-finite floats become ``null``) and the
validation every receiver runs before it trusts a frame.

Never: imports torch or anything outside the standard library; this module is
the only code ``layerscope.server`` and ``layerscope.trainer`` share.

Frames (JSON text, snake_case, every one has ``type`` and ``v``):

trainer -> server
  hello      {run_id, name, config, layers: [{name, kind, units}], last_acked_seq,
              last_cmd_seq, device?, world_size?, instance?, upload?}
             instance: the trainer process's own id (a short plain string, e.g. a uuid
             hex; null or absent from older trainers and spools). The server keeps the
             first one a run's hellos carry and refuses a hello for that run id with
             another (an error frame, then close 1008): two processes that share a run
             id are two runs, not one. The same process reconnecting, or ``layerscope
             sync`` of its spool, sends the same instance.
             upload: true when ``layerscope sync`` uploads a spool (absent or false:
             a trainer). Nothing on such a connection applies commands: the server
             refuses commands to the run while it is attached. A server that predates
             the field ignores it (a hello's unknown fields are dropped).
             run_id: a plain name (no '/', '\\', '..') without control characters.
  metrics    {seq, rows: [{step, time_s, values: {series: float|null}}]}
             A run holds at most MAX_SERIES series (and MAX_LAYERS layers, from its
             hellos and probe frames): the server drops a new name past the limit from
             the frame, stores the rest, and names what it dropped in an error frame.
  probe      {seq, step, layers: [{name, mean, std, min, max, zero_frac, nonfinite,
              dead_ratio, saturated_frac, saturated_ratio, grad_norm, weight_norm,
              update_ratio, unit_spread, hist: {lo, hi, counts: [int]}}]}
                                       (absent stats are null; hist lo <= hi)
  event      {seq, step, kind, data}   kind in EVENT_KINDS; a status event's
                                       data.status is one of RUN_STATUSES
  heartbeat  {step, status}            (not stored, no seq)
  Frames after the hello are the hello's run's: they need no run_id, and one naming
  another run is refused.
  No string in any frame (keys included) may hold a lone surrogate (U+D800-DFFF, JSON's
  "\\udce9": how Python carries a file name that is not UTF-8; no text): the frame is
  refused, naming where (lone_surrogate), as is an integer literal of more than 4300 digits.

server -> trainer
  ack        {seq}                      highest contiguous committed seq
  command    {id, cmd_seq, name, args, source}
  error      {message}

browser <-> server
  snapshot, live frames (metrics/probe/event/status), command_result  (server -> browser)
  command    {id, name, args, source?}  (browser -> server; source user or api)
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from itertools import chain, repeat
from operator import itemgetter, le
from typing import Any

VERSION = 1

# ---- limits (enforced by every receiver; documented in the README) ----
MAX_FRAME_BYTES = 2 * 1024 * 1024  # one websocket text frame
MAX_BINS = 1024  # histogram bins per layer
MAX_LAYERS = 2048  # layers per run / per probe frame
# Distinct scalar series per run: a trainer logging a new name every step made 100k series
# (a 4.9 MB snapshot read in 7.7 s before the run page drew anything). The server stores a
# run's first MAX_SERIES series and refuses later new names, by name, in an error frame.
MAX_SERIES = 4096
MAX_NAME_LEN = 256  # layer, series and run names
MAX_INSTANCE_LEN = 64  # a hello's instance: a uuid hex is 32
_INSTANCE = re.compile(f"[A-Za-z0-9._-]{{1,{MAX_INSTANCE_LEN}}}")
MAX_ROWS = 10_000  # metric rows per frame
MAX_VALUES_PER_ROW = 256  # scalar series per metric row
MAX_CONFIG_BYTES = 64 * 1024  # run config in hello
MAX_DEPTH = 32  # nesting of a hello's config and an event's data (objects and lists)
MAX_INT = 2**62 - 1  # seq, step and other counters: SQLite's 64-bit integers, with room
MAX_COUNT = 2**64 - 1  # one histogram bin's count (stored as up to 64 unsigned bits)

# ---- vocabularies ----
TRAINER_TYPES = frozenset({"hello", "metrics", "probe", "event", "heartbeat"})
EVENT_KINDS = frozenset({"alert", "command_result", "checkpoint", "status", "log", "sanity"})
COMMANDS = frozenset(
    {
        "pause",
        "resume",
        "step_once",
        "set_lr_scale",
        "set_weight_decay",
        "set_frozen",
        "checkpoint",
        "stop",
        "set_rules",
    }
)
# The args each command takes (the others take none); an arg not listed is refused.
COMMAND_ARGS: dict[str, tuple[str, ...]] = {
    "set_lr_scale": ("value",),
    "set_weight_decay": ("enabled",),
    "set_frozen": ("layers", "frozen"),
    "set_rules": ("silenced", "auto_halve_lr", "auto_weight_decay"),
}
# The diagnostic rules (trainer/rules.py evaluates them); here so set_rules validates stdlib-only.
RULE_NAMES = (
    "DeadUnits",
    "Saturation",
    "VanishingGradient",
    "ExplodingTensor",
    "LossNotDecreasing",
    "Overfit",
    "AllZero",
    "PoorInitialization",
)
RUN_STATUSES = ("starting", "running", "paused", "finished", "failed", "stopped", "lost")
ENDED_STATUSES = frozenset({"finished", "failed", "stopped", "lost"})
COMMAND_SOURCES = frozenset({"user", "api", "rule"})
# What a browser or script may send: "rule" is the trainer's own (a rule's action, which
# reaches the server as a command_result event), never a client's.
CLIENT_COMMAND_SOURCES = frozenset({"user", "api"})
PROBE_STATS = (
    "mean",
    "std",
    "min",
    "max",
    "zero_frac",
    "nonfinite",
    "dead_ratio",
    "saturated_frac",
    "saturated_ratio",
    "grad_norm",
    "weight_norm",
    "update_ratio",
    "unit_spread",
)

# Websocket close codes (RFC 6455).
CLOSE_UNSUPPORTED = 1003  # binary frame where text is expected
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008  # auth, origin, protocol misuse
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013  # slow viewer dropped; reconnect and catch up


class WireError(ValueError):
    """A frame that breaks the protocol. ``close_code`` says how to close, if at all."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


# ---- encoding ----


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def encode(message: dict[str, Any], dumps: Callable[[Any], bytes] | None = None) -> str:
    """JSON text with NaN/Inf as null, so plain ``JSON.parse`` accepts every frame.

    ``dumps``: a faster encoder the caller may pass that writes NaN/Inf as null
    (the trainer's link passes ``orjson.dumps``, ~14x faster on a probe frame; this
    module stays stdlib-only). Whatever it refuses with a TypeError (a lone surrogate,
    an integer beyond 64 bits, a type it does not know) goes through ``json`` below."""
    message = {"v": VERSION, **message}
    if dumps is not None:
        try:
            return dumps(message).decode()
        except TypeError:  # orjson.JSONEncodeError is one
            pass
    try:
        return json.dumps(message, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_clean(message), separators=(",", ":"), allow_nan=False)


_UNPARSED = object()


def _reject_constant(name: str) -> Any:
    raise WireError(f"non-standard JSON constant {name}", CLOSE_INVALID_DATA)


# ---- lone surrogates ----
# Python turns the bytes of a file name (or argv) that is not UTF-8 into lone surrogates
# (os.fsdecode('caf\xe9') is 'caf\udce9'); JSON can carry one as an escape ("\udce9"), but
# it is no text: SQLite refused to store it (the run's frames failed, 1011, every
# reconnect) or stored it in a JSON column that every later read failed to answer (500).

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in a decoded str, a pair is one char
# In frame text: a JSON escape of a surrogate (a pair's halves too), or a raw one.
_SURROGATE_IN_TEXT = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def _holds(char: str) -> str:
    return (
        f"holds U+{ord(char):04X}, which is not valid UTF-8 text (a lone surrogate, as"
        " Python decodes a file name that is not UTF-8)"
    )


def surrogate_problem(where: str, char: str) -> str:
    """The one wording for a lone surrogate found at ``where``."""
    return f"{where} {_holds(char)}"


def _member(where: str, key: Any) -> str:
    if isinstance(key, str) and key.isidentifier():
        return f"{where}.{key}" if where else key
    return f"{where}[{key!r:.60}]"


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """Why ``value`` (a JSON value: its strings, keys included, at any depth) is no text,
    naming the first string that holds a lone surrogate (``config.data``, ``rows[0].values
    key 'x\\udc80'``), or None. ``where``: the name of ``value`` itself. Walked without
    recursion (a value may be nested deeper than the recursion limit)."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, str):
            found = _LONE_SURROGATE.search(node)
            if found is not None:
                return surrogate_problem(at or "a string", found.group())
        elif isinstance(node, dict):
            for key in node:
                if isinstance(key, str) and (found := _LONE_SURROGATE.search(key)) is not None:
                    return surrogate_problem(f"{at or 'an object'} key {key!r:.80}", found.group())
            stack.extend(reversed([(v, _member(at, k)) for k, v in node.items()]))
        elif isinstance(node, (list, tuple)):
            stack.extend(reversed([(v, f"{at}[{i}]") for i, v in enumerate(node)]))
    return None


def surrogate_errors(value: Any, limit: int = 10) -> list[dict[str, Any]]:
    """Each string in a REST body (``value``, a JSON value: keys included, at any depth)
    that holds a lone surrogate, as ``{loc, msg}`` (a 422's detail; a key in ``loc``
    escaped, escape_surrogates, so the answer itself is text), at most ``limit`` of them.
    FastAPI's JSON parser accepts ``"\\udce9"``, which the store then failed on (500),
    or stored where every later read of the run failed."""
    errors: list[dict[str, Any]] = []
    stack: list[tuple[Any, list[Any]]] = [(value, [])]
    while stack and len(errors) < limit:
        node, loc = stack.pop()
        if isinstance(node, str):
            found = _LONE_SURROGATE.search(node)
            if found is not None:
                errors.append({"loc": loc, "msg": _holds(found.group())})
        elif isinstance(node, dict):
            items = []
            for key, item in node.items():
                found = _LONE_SURROGATE.search(key) if isinstance(key, str) else None
                if found is not None:
                    errors.append(
                        {
                            "loc": [*loc, escape_surrogates(key)],
                            "msg": f"the key {_holds(found.group())}",
                        }
                    )
                else:
                    items.append((item, [*loc, key]))
            stack.extend(reversed(items))
        elif isinstance(node, (list, tuple)):
            stack.extend(reversed([(v, [*loc, i]) for i, v in enumerate(node)]))
    return errors[:limit]


def _escape_one(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def escape_surrogates(value: Any) -> Any:
    """``value`` (a str, or a JSON value at any depth, keys included) with each lone
    surrogate written as a backslash escape: U+DC80..U+DCFF, a byte that was not UTF-8
    (os.fsdecode's surrogateescape), as ``\\xNN``, which is what
    ``os.fsencode(s).decode("utf-8", "backslashreplace")`` makes of a file name; any other
    as ``\\uNNNN``. Valid text comes back unchanged."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub(_escape_one, value)
    if isinstance(value, dict):
        return {escape_surrogates(k): escape_surrogates(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [escape_surrogates(v) for v in value]
    return value


def decode(text: str | bytes, loads: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Parse one frame; raises WireError naming the problem.

    ``loads``: a faster strict RFC 8259 decoder the caller may pass (the server passes
    ``orjson.loads``; this module stays stdlib-only). Whatever it refuses (NaN,
    Infinity, lone surrogates, numbers beyond a double, deep nesting) goes through
    ``json`` below, which accepts or names the problem exactly as without it. The one
    difference: an integer literal beyond 64 bits may reach validation as a float, so
    an integer field refuses it as "not an integer" rather than "too large".

    A string holding a lone surrogate (``"\\udce9"``: no text, see lone_surrogate) is
    refused, naming where. An integer literal of more digits than Python converts
    (4,300) is refused by name.
    """
    message, problem = _decode(text, loads)
    if problem is not None:
        raise WireError(problem)
    return message


def _decode(
    text: str | bytes, loads: Callable[[str], Any] | None
) -> tuple[dict[str, Any], str | None]:
    """decode, but a lone surrogate is returned (the message as parsed, and why it is
    refused), not raised."""
    if isinstance(text, (bytes, bytearray)):
        raise WireError("binary frames are not accepted; send JSON text", CLOSE_UNSUPPORTED)
    # The limit counts UTF-8 bytes (1.9 million two-byte characters passed it when it
    # counted characters). A character is at most 4 bytes: a text of up to a quarter of
    # the limit is within it without being encoded to find out.
    if len(text) > MAX_FRAME_BYTES // 4:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_FRAME_BYTES:
            raise WireError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}", CLOSE_TOO_BIG)
    message: Any = _UNPARSED
    problem: str | None = None
    if loads is not None:
        try:
            message = loads(text)
        except ValueError:  # orjson.JSONDecodeError is one; json names the problem below
            message = _UNPARSED
    if message is _UNPARSED:
        try:
            message = json.loads(text, parse_constant=_reject_constant)
        except WireError:
            raise
        except json.JSONDecodeError as exc:
            raise WireError(f"malformed JSON: {exc.msg} at position {exc.pos}") from None
        except RecursionError:  # e.g. a megabyte of '[': refused, not a crashed handler
            raise WireError("malformed JSON: nested too deeply") from None
        except ValueError:  # int(): "Exceeds the limit (4300 digits)": it dropped the socket
            raise WireError(
                "malformed JSON: an integer literal of more than"
                f" {sys.get_int_max_str_digits()} digits"
            ) from None
        # orjson refuses every lone surrogate, json none: looked for only when the text
        # holds one (escaped or raw), and then only a lone one is refused, not a pair.
        if _SURROGATE_IN_TEXT.search(text) is not None:
            problem = lone_surrogate(message)
    if not isinstance(message, dict):
        raise WireError("a frame must be a JSON object")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise WireError("frame has no string 'type'")
    v = message.get("v", VERSION)
    if v != VERSION:
        raise WireError(f"unsupported schema version {v!r}; this server speaks v{VERSION}")
    return message, problem


def new_id() -> str:
    return uuid.uuid4().hex


# ---- validation helpers ----


_INT_ONLY = frozenset({int})  # bool is a subclass of int but not an int here


def _int(msg: dict[str, Any], key: str, *, minimum: int = 0) -> int:
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"'{key}' must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise WireError(f"'{key}' must be >= {minimum}, got {value}")
    if value > MAX_INT:
        raise WireError(f"'{key}' must be <= {MAX_INT} (2**62 - 1)")
    return value


def _num(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"{where} must be a number or null, got {type(value).__name__}")
    try:
        f = float(value)
    except OverflowError:  # an int beyond float's range is as non-finite as inf
        return None
    return f if math.isfinite(f) else None


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise WireError(f"{where} must be a non-empty string")
    if len(value) > MAX_NAME_LEN:
        raise WireError(f"{where} is {len(value)} characters; the limit is {MAX_NAME_LEN}")
    return value


def plain_run_id(run_id: str) -> bool:
    """Whether a run id is a plain name: it names the run's folder on both sides
    (``layerscope-runs/<id>``) and one URL path segment (``/api/runs/<id>``), so no
    ``/``, ``\\`` or NUL, and not ``.`` or ``..``."""
    return run_id not in (".", "..") and not any(c in run_id for c in "/\\\0")


# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators: in a
# run id they went raw into the server's log lines (a newline forged a log line, ESC
# drove the terminal reading it).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def control_char(text: str) -> str | None:
    """The first control character in ``text`` (a newline, ESC, NUL, ...), or None."""
    found = _CONTROL.search(text)
    return None if found is None else found.group()


def run_id_problem(run_id: str) -> str | None:
    """Why ``run_id`` cannot name a run (said after the id), or None: the one rule the
    server's hello, ``watch()`` and ``layerscope sync`` refuse by."""
    if not plain_run_id(run_id):
        return "must be a plain name: no '/', '\\' or '..'"
    found = _LONE_SURROGATE.search(run_id)
    if found is not None:
        return _holds(found.group())
    bad = control_char(run_id)
    if bad is not None:
        return (
            f"holds the control character U+{ord(bad):04X};"
            " a run id is printable text (it names the run in URLs, folders and logs)"
        )
    return None


def _nesting(value: Any, where: str) -> None:
    """Refuses ``value`` nested more than MAX_DEPTH objects/lists deep, by name (walked
    without recursion: a few hundred levels made the recursive walks after it, and the
    store's, raise RecursionError, which dropped the connection with no reason)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_DEPTH:
            raise WireError(f"{where} is nested more than {MAX_DEPTH} levels deep")
        stack.extend(zip(children, repeat(depth + 1)))


def _obj(msg: dict[str, Any], key: str) -> dict[str, Any]:
    value = msg.get(key)
    if not isinstance(value, dict):
        raise WireError(f"'{key}' must be an object")
    return value


def _list(msg: dict[str, Any], key: str, limit: int) -> list[Any]:
    value = msg.get(key)
    if not isinstance(value, list):
        raise WireError(f"'{key}' must be a list")
    if len(value) > limit:
        raise WireError(f"'{key}' has {len(value)} entries; the limit is {limit}")
    return value


# ---- per-type validation (returns a normalised copy) ----


def validate_hello(msg: dict[str, Any]) -> dict[str, Any]:
    run_id = _name(msg.get("run_id"), "'run_id'")
    problem = run_id_problem(run_id)
    if problem is not None:
        raise WireError(f"'run_id' {run_id!r:.80} {problem}")
    problem = lone_surrogate(msg)  # decode refuses it in frame text; watch() passes a dict
    if problem is not None:
        raise WireError(problem)
    name = _name(msg.get("name", run_id), "'name'")
    config = msg.get("config", {})
    if not isinstance(config, dict):
        raise WireError("'config' must be an object")
    _nesting(config, "'config'")
    if len(json.dumps(config, default=str)) > MAX_CONFIG_BYTES:
        raise WireError(f"'config' exceeds {MAX_CONFIG_BYTES} bytes")
    layers = []
    for i, layer in enumerate(_list(msg, "layers", MAX_LAYERS) if "layers" in msg else []):
        if not isinstance(layer, dict):
            raise WireError(f"layers[{i}] must be an object")
        units = layer.get("units")
        if units is not None and (type(units) is not int or not 0 <= units <= MAX_INT):
            raise WireError(f"layers[{i}].units must be an integer from 0 to {MAX_INT}, or null")
        layers.append(
            {
                "name": _name(layer.get("name"), f"layers[{i}].name"),
                "kind": _name(layer.get("kind", "module"), f"layers[{i}].kind"),
                "units": units,
            }
        )
    _unique_names(layers)
    return {
        "type": "hello",
        "run_id": run_id,
        "name": name,
        "config": config,
        "layers": layers,
        "last_acked_seq": _int(msg, "last_acked_seq") if "last_acked_seq" in msg else 0,
        "last_cmd_seq": _int(msg, "last_cmd_seq") if "last_cmd_seq" in msg else 0,
        "device": _device(msg.get("device")),
        "world_size": _int(msg, "world_size", minimum=1) if "world_size" in msg else 1,
        "instance": _instance(msg.get("instance")),
        "upload": _flag(msg, "upload"),
    }


def _device(value: Any) -> str:
    """A hello's device: a string (kept to MAX_NAME_LEN characters); absent or null: ""."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WireError(f"'device' must be a string or null, got {type(value).__name__}")
    return value[:MAX_NAME_LEN]


def _flag(msg: dict[str, Any], key: str) -> bool:
    """An optional boolean field: absent or null is False."""
    value = msg.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise WireError(f"{key!r} must be true, false or null, got {value!r:.80}")
    return value


def _instance(value: Any) -> str | None:
    """A hello's instance: None (absent or null), or 1-MAX_INSTANCE_LEN of ASCII letters,
    digits, '-', '_' and '.'."""
    if value is None:
        return None
    if not isinstance(value, str) or _INSTANCE.fullmatch(value) is None:
        raise WireError(
            f"'instance' must be null or 1-{MAX_INSTANCE_LEN} ASCII letters, digits, '-', '_'"
            f" or '.' (a uuid hex, say), got {value!r:.80}"
        )
    return value


def validate_metrics(msg: dict[str, Any]) -> dict[str, Any]:
    seq = _int(msg, "seq", minimum=1)
    rows = []
    # Every scalar of every step passes here: a row whose names are sane strings and
    # whose values are floats/nulls is checked by C-level walks (type sets, name
    # lengths, one sum any inf or nan poisons); anything else takes the per-value
    # path, which converts ints and names the bad field.
    for i, row in enumerate(_list(msg, "rows", MAX_ROWS)):
        if not isinstance(row, dict):
            raise WireError(f"rows[{i}] must be an object")
        step = row.get("step")
        if type(step) is not int or step < 0 or step > MAX_INT:
            step = _int(row, "step")
        values = row.get("values")
        if not isinstance(values, dict):
            raise WireError(f"rows[{i}].values must be an object")
        if len(values) > MAX_VALUES_PER_ROW:
            raise WireError(
                f"rows[{i}].values has {len(values)} series; limit {MAX_VALUES_PER_ROW}"
            )
        if (
            set(map(type, values)) <= _STR_ONLY
            and set(map(type, values.values())) <= _FLOAT_OR_NONE
            and (not values or min(map(len, values)) > 0 and max(map(len, values)) <= MAX_NAME_LEN)
            and math.isfinite(sum(filter(None, values.values())))
        ):
            clean = dict(values)
        else:
            clean = {
                _name(k, f"rows[{i}] series name"): _num(v, f"rows[{i}].values[{k!r}]")
                for k, v in values.items()
            }
        time_s = row.get("time_s")
        if type(time_s) is not float or not math.isfinite(time_s):
            time_s = _num(time_s, "time_s")
        rows.append({"step": step, "time_s": time_s, "values": clean})
    return {"type": "metrics", "seq": seq, "rows": rows}


def validate_probe(msg: dict[str, Any]) -> dict[str, Any]:
    return _validate_probe(msg, maybe_bools=True)


def _validate_probe(
    msg: dict[str, Any], *, maybe_bools: bool, strict: bool = True
) -> dict[str, Any]:
    """maybe_bools=False: the caller knows no value in msg is a bool (parse_trainer_frame,
    whose text holds no ``true``/``false``), which spares the fast path a type walk.
    strict=False: a frame read back from the store (see parse_trainer_frame)."""
    seq = _int(msg, "seq", minimum=1)
    step = _int(msg, "step")
    given = _list(msg, "layers", MAX_LAYERS)
    layers = _clean_probe_layers(given, maybe_bools)
    if layers is None:
        layers = [_probe_layer(i, layer, strict) for i, layer in enumerate(given)]
        if strict:
            _unique_names(layers)
    return {"type": "probe", "seq": seq, "step": step, "layers": layers}


_PROBE_LAYER = dict.fromkeys(("name", *PROBE_STATS, "hist"))  # a clean layer's keys, in order
_PROBE_HIST = dict.fromkeys(("lo", "hi", "counts"))
_STATS_OF = itemgetter(*PROBE_STATS)
_DICT_ONLY = frozenset({dict})
_LIST_ONLY = frozenset({list})
_STR_ONLY = frozenset({str})
_FLOAT_ONLY = frozenset({float})
_FLOAT_OR_NONE = frozenset({float, type(None)})
_NUMBER_OR_NONE = frozenset({float, int, type(None)})
_consume: Callable[[Iterable[Any]], None] = deque(maxlen=0).extend  # runs a map for its effects


def _clean_probe_layers(layers: list[Any], maybe_bools: bool) -> list[dict[str, Any]] | None:
    """Every layer of a well-formed probe frame at once, or None when anything is off
    (then the per-layer path names the problem, or normalises what this one does not,
    such as keys a layer should not have).

    The server runs this on every probe frame (50 layers x 13 stats x 64 bins): each
    step is one C-level walk over a whole column (all names, all stats, all counts),
    since a Python loop per layer cost more than decoding the frame. Each output layer
    is a copy of a template holding every key, updated from the input, so absent
    stats are null and the key order is fixed. It accepts a subset of what
    _probe_layer accepts and returns exactly what it would.
    """
    if not layers:
        return []
    if set(map(type, layers)) != _DICT_ONLY:
        return None
    out = list(map(dict.copy, repeat(_PROBE_LAYER, len(layers))))
    _consume(map(dict.update, out, layers))
    if set(map(len, out)) != {len(_PROBE_LAYER)}:  # a key the template does not have
        return None
    names: list[Any] = list(map(itemgetter("name"), out))
    if set(map(type, names)) != _STR_ONLY:
        return None
    lengths = list(map(len, names))
    if min(lengths) == 0 or max(lengths) > MAX_NAME_LEN:
        return None
    if len(set(names)) != len(names):  # a name twice: the per-layer path names it
        return None
    stats = list(chain.from_iterable(map(_STATS_OF, out)))
    kinds = set(map(type, stats))
    if not kinds <= _NUMBER_OR_NONE:  # bool is its own type: not a number here
        return None
    if int in kinds:
        try:
            stats = [v if v is None else float(v) for v in stats]
        except OverflowError:  # an int too big for a float: _probe_layer's to report
            return None
        # zip over one iterator repeated: each row takes the next len(PROBE_STATS) stats.
        rows = zip(*[iter(stats)] * len(PROBE_STATS), strict=True)
        _consume(map(dict.update, out, map(zip, repeat(PROBE_STATS), rows)))
    if not math.isfinite(sum(filter(None, stats))):  # any inf or nan poisons the sum
        return None
    with_hist = [layer for layer in out if layer["hist"] is not None]
    if with_hist:
        given = list(map(itemgetter("hist"), with_hist))
        if set(map(type, given)) != _DICT_ONLY:
            return None
        hists = list(map(dict.copy, repeat(_PROBE_HIST, len(given))))
        _consume(map(dict.update, hists, given))
        if set(map(len, hists)) != {len(_PROBE_HIST)}:
            return None
        counts: list[Any] = list(map(itemgetter("counts"), hists))
        if set(map(type, counts)) != _LIST_ONLY or max(map(len, counts)) > MAX_BINS:
            return None
        los = list(map(itemgetter("lo"), hists))
        his = list(map(itemgetter("hi"), hists))
        bounds = [*los, *his]
        if set(map(type, bounds)) != _FLOAT_ONLY or not math.isfinite(sum(bounds)):
            return None
        if not all(map(le, los, his)):  # a range upside down: _probe_layer names it
            return None
        cells = list(chain.from_iterable(counts))
        if cells:
            if maybe_bools and set(map(type, cells)) != _INT_ONLY:
                return None
            try:  # packing as u64 refuses floats, negatives and the too big in one walk
                struct.pack(f"<{len(cells)}Q", *cells)
            except struct.error:
                return None
        _consume(map(dict.__setitem__, with_hist, repeat("hist"), hists))
    return out


def _unique_names(layers: list[dict[str, Any]]) -> None:
    """Refuses a layer name given twice (rows are kept by layer name: the second one's
    replaced the first's, which was lost without a word)."""
    seen: dict[str, int] = {}
    for i, layer in enumerate(layers):
        first = seen.setdefault(layer["name"], i)
        if first != i:
            raise WireError(
                f"layers[{i}].name {layer['name']!r:.80} repeats layers[{first}].name;"
                " each layer is named once"
            )


def _probe_layer(i: int, layer: Any, strict: bool = True) -> dict[str, Any]:
    """One layer, checked field by field: names the first bad field."""
    if not isinstance(layer, dict):
        raise WireError(f"layers[{i}] must be an object")
    out: dict[str, Any] = {"name": _name(layer.get("name"), f"layers[{i}].name")}
    for stat in PROBE_STATS:
        out[stat] = _num(layer.get(stat), f"layers[{i}].{stat}")
    hist = layer.get("hist")
    if hist is not None:
        if not isinstance(hist, dict):
            raise WireError(f"layers[{i}].hist must be an object or null")
        counts = hist.get("counts")
        if not isinstance(counts, list):
            raise WireError(f"layers[{i}].hist.counts must be a list")
        if len(counts) > MAX_BINS:
            raise WireError(
                f"layers[{i}].hist has {len(counts)} bins; the limit is {MAX_BINS}",
            )
        if counts and (
            not set(map(type, counts)) <= _INT_ONLY or min(counts) < 0 or max(counts) > MAX_COUNT
        ):
            raise WireError(
                f"layers[{i}].hist.counts must be integers from 0 to {MAX_COUNT} (2**64 - 1)"
            )
        lo, hi = hist.get("lo"), hist.get("hi")
        if type(lo) is not float or not math.isfinite(lo):
            lo = _num(lo, f"layers[{i}].hist.lo")
        if type(hi) is not float or not math.isfinite(hi):
            hi = _num(hi, f"layers[{i}].hist.hi")
        if strict and lo is not None and hi is not None and lo > hi:
            raise WireError(
                f"layers[{i}].hist.lo ({lo!r}) is above layers[{i}].hist.hi ({hi!r});"
                " a histogram's range must have lo <= hi"
            )
        hist = {"lo": lo, "hi": hi, "counts": counts}
    out["hist"] = hist
    return out


def validate_event(msg: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """strict=False: a frame read back from the store (see parse_trainer_frame)."""
    seq = _int(msg, "seq", minimum=1)
    step = _int(msg, "step")
    kind = msg.get("kind")
    if kind not in EVENT_KINDS:
        raise WireError(f"unknown event kind {kind!r}; expected one of {sorted(EVENT_KINDS)}")
    data = msg.get("data", {})
    if not isinstance(data, dict):
        raise WireError("'data' must be an object")
    if strict:
        _nesting(data, "'data'")
        problem = lone_surrogate(data, "data")  # decode's check, for watch()'s w.event()
        if problem is not None:
            raise WireError(problem)
    data = _clean(data)  # measured as sent: NaN/Inf become null
    if len(json.dumps(data, default=str)) > MAX_CONFIG_BYTES:
        raise WireError(f"event data exceeds {MAX_CONFIG_BYTES} bytes")
    for key, kinds in _EVENT_FIELDS.get(kind, {}).items():
        value = data.get(key)
        if value is None:
            continue
        if type(value) not in kinds:
            allowed = " or ".join(k.__name__ for k in kinds)
            raise WireError(f"{kind} event: data.{key} must be {allowed} or null")
        if type(value) is int and not 0 <= value <= MAX_INT:
            raise WireError(f"{kind} event: data.{key} must be from 0 to {MAX_INT}")
    if strict and kind == "status" and data.get("status") not in RUN_STATUSES:
        # It sets the run's status: one it does not know would be stored and do nothing.
        raise WireError(
            f"status event: data.status must be one of {list(RUN_STATUSES)},"
            f" got {data.get('status')!r:.80}"
        )
    return {"type": "event", "seq": seq, "step": step, "kind": kind, "data": data}


# The fields of a status or command_result event that the server stores in columns of
# their own (the run's status, a command's row), by the types those columns take.
_EVENT_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "status": {"status": (str,), "reason": (str,), "control": (dict,)},
    "command_result": {
        "id": (str,), "cmd_seq": (int,), "name": (str,), "ok": (bool,), "error": (str,),
        "applied_at_step": (int,), "state": (dict,),
    },
}  # fmt: skip


def validate_heartbeat(msg: dict[str, Any]) -> dict[str, Any]:
    status = msg.get("status", "running")
    if status not in RUN_STATUSES:
        raise WireError(f"unknown status {status!r}")
    return {"type": "heartbeat", "step": _int(msg, "step"), "status": status}


_VALIDATORS = {
    "hello": validate_hello,
    "metrics": validate_metrics,
    "probe": validate_probe,
    "event": validate_event,
    "heartbeat": validate_heartbeat,
}


def parse_trainer_frame(
    text: str | bytes, loads: Callable[[str], Any] | None = None, *, run_id: str | None = None
) -> dict[str, Any]:
    """Decode (``loads`` as in ``decode``) and validate one trainer -> server frame.

    ``run_id``: the run the connection's hello named, for a frame as the server receives
    it. A frame after the hello needs no ``run_id`` (the connection is one run's); one
    naming another run is refused, not stored as this run's. Refused too then (checks
    that came after frames were first stored as their wire text, which the store reads
    back through here without ``run_id``, so a frame once stored stays readable): a
    histogram whose ``lo`` is above its ``hi``, and a status event whose ``data.status``
    is not a run status."""
    strict = run_id is not None
    msg, problem = _decode(text, loads)
    if problem is not None:
        # A frame read back from the store (no run_id) that was stored before lone
        # surrogates were refused is read with them escaped, not refused: it stays readable.
        if strict or msg["type"] == "hello":
            raise WireError(problem)
        msg = escape_surrogates(msg)
    if strict and msg["type"] != "hello":
        named = msg.get("run_id")
        if named is not None and named != run_id:
            raise WireError(
                f"{msg['type']} frame names run {named!r:.80} but this connection's hello"
                f" named {run_id!r:.80}; send each run's frames on its own connection"
            )
    if msg["type"] == "probe":
        # JSON makes a bool only of these words: text without them holds none.
        maybe_bools = not isinstance(text, str) or "true" in text or "false" in text
        return _validate_probe(msg, maybe_bools=maybe_bools, strict=strict)
    if msg["type"] == "event":
        return validate_event(msg, strict=strict)
    validator = _VALIDATORS.get(msg["type"])
    if validator is None:
        raise WireError(
            f"unknown frame type {msg['type']!r}; expected one of {sorted(TRAINER_TYPES)}"
        )
    return validator(msg)


def validate_command(
    msg: dict[str, Any], *, sources: frozenset[str] = COMMAND_SOURCES
) -> dict[str, Any]:
    """A command: {id?, name, args, source?}. Returns it normalised. ``sources``: the
    sources the sender may claim (the server passes CLIENT_COMMAND_SOURCES for a
    browser's or script's command; the trainer's own rules make ``rule`` ones)."""
    # A REST body is no frame text: its id, reason or layer names reached the store, which
    # could not store them (500) or stored what every later read of the run failed on.
    problem = lone_surrogate(msg)
    if problem is not None:
        raise WireError(problem)
    name = msg.get("name")
    if name not in COMMANDS:
        raise WireError(f"unknown command {name!r}; expected one of {sorted(COMMANDS)}")
    cmd_id = msg.get("id") or new_id()
    if not isinstance(cmd_id, str) or len(cmd_id) > 64:
        raise WireError("'id' must be a string of at most 64 characters")
    args = msg.get("args") or {}
    if not isinstance(args, dict):
        raise WireError("'args' must be an object")
    takes = COMMAND_ARGS.get(name, ())
    unknown = sorted(map(str, set(args) - set(takes)))
    if unknown:  # they were dropped without a word: a misspelt arg did nothing
        raise WireError(
            f"{name} takes {'args.' + ', args.'.join(takes) if takes else 'no args'};"
            f" got args.{', args.'.join(unknown)}"[:300]
        )
    clean: dict[str, Any] = {}
    if name == "set_lr_scale":
        value = _num(args.get("value"), "args.value")
        if value is None or not (0.0 <= value <= 1e6):
            raise WireError("set_lr_scale needs args.value, a finite number in [0, 1e6]")
        clean["value"] = value
    elif name == "set_weight_decay":
        enabled = args.get("enabled")
        if not isinstance(enabled, bool):
            raise WireError("set_weight_decay needs args.enabled, true or false")
        clean["enabled"] = enabled
    elif name == "set_frozen":
        layers = args.get("layers")
        frozen = args.get("frozen")
        if not isinstance(layers, list) or not layers or len(layers) > MAX_LAYERS:
            raise WireError("set_frozen needs args.layers, a non-empty list of layer names")
        if not isinstance(frozen, bool):
            raise WireError("set_frozen needs args.frozen, true or false")
        clean["layers"] = [_name(x, "args.layers[]") for x in layers]
        clean["frozen"] = frozen
    elif name == "set_rules":
        clean = _set_rules_args(args)
    source = msg.get("source", "user")
    if source not in sources:
        if source in COMMAND_SOURCES:
            raise WireError(
                f"command source {source!r} is the trainer's own; "
                f"a client sends {' or '.join(repr(s) for s in sorted(sources))}"
            )
        raise WireError(f"unknown command source {source!r}")
    out = {"id": cmd_id, "name": name, "args": clean, "source": source}
    reason = msg.get("reason")
    if reason is not None:
        if not isinstance(reason, str):  # its Python repr was stored as the reason
            raise WireError(f"'reason' must be a string or null, got {type(reason).__name__}")
        out["reason"] = reason[:1000]
    return out


def _set_rules_args(args: dict[str, Any]) -> dict[str, Any]:
    """set_rules is a partial target state: absent keys stay as they are."""
    known = ("silenced", "auto_halve_lr", "auto_weight_decay")
    unknown = sorted(set(args) - set(known))
    if unknown or not args:
        raise WireError(f"set_rules needs one or more of args.{', args.'.join(known)}")
    clean: dict[str, Any] = {}
    if "silenced" in args:
        silenced = args["silenced"]
        if not isinstance(silenced, list) or any(n not in RULE_NAMES for n in silenced):
            raise WireError(
                f"set_rules args.silenced must be a list of rule names from {list(RULE_NAMES)}"
            )
        clean["silenced"] = [n for n in RULE_NAMES if n in silenced]
    for key in known[1:]:
        if key in args:
            if not isinstance(args[key], bool):
                raise WireError(f"set_rules args.{key} must be true or false")
            clean[key] = args[key]
    return clean


def validate_command_frame(msg: dict[str, Any]) -> dict[str, Any]:
    """server -> trainer command frame as the trainer receives it."""
    cmd = validate_command(msg)
    cmd["cmd_seq"] = _int(msg, "cmd_seq", minimum=1)
    return cmd


# ---- experiment config ----
# The schema of built-in runs lives in experiment_config.py (stdlib only) to keep
# this module about frames; it is reached through wire, so the server still imports
# nothing from the trainer but this module. Loaded on first use: experiment_config
# itself imports wire.
_EXPERIMENT_NAMES = frozenset(
    {
        "ACTIVATIONS",
        "ARCHS",
        "DATASETS",
        "DEFAULT_STEPS",
        "DEMO_EXPERIMENT",
        "DEVICES",
        "EXPERIMENT_SCHEMA",
        "ExperimentError",
        "IMAGE_DATASETS",
        "INITS",
        "OPTIMIZERS",
        "PREPROCESS",
        "experiment_rule_names",
    }
)

# A built-in run's size budget: the parameters its model fields alone imply (depth 64 x
# width 4096 is about 1e9, with adam's state 12+ GB, on a machine the New-run form reaches).
MAX_MODEL_PARAMS = 50_000_000
CNN_KERNEL = 3  # models.CNN's 3x3 convolutions


def model_param_floor(model: dict[str, Any]) -> int:
    """The parameters a validated ``model`` section implies whatever the data: its hidden
    layers (an mlp's width x width Linears after the first, a cnn's 3x3 convolutions, with
    batch norm's scale and shift) and one input and one output unit. The real model has
    more: its input layer and head grow with the data."""
    depth, width = int(model["depth"]), int(model["width"])
    norm = 2 * width if model.get("batch_norm") else 0
    if model.get("arch") == "cnn":
        per_block = CNN_KERNEL * CNN_KERNEL * width * width + width + norm
        first = CNN_KERNEL * CNN_KERNEL * width + width + norm
    else:
        per_block = width * width + width + norm
        first = width + width + norm
    return first + (depth - 1) * per_block + width + 1


def validate_experiment(cfg: Any, *, explicit: Any = ()) -> dict[str, Any]:
    """``experiment_config.validate_experiment`` (the full config with defaults filled;
    ExperimentError listing every bad field) and a size budget: a model whose fields imply
    more than MAX_MODEL_PARAMS parameters (model_param_floor) is refused, naming both
    counts, for the New-run form, labs and ``layerscope train`` alike."""
    from layerscope.trainer import experiment_config

    out = experiment_config.validate_experiment(cfg, explicit=explicit)
    model = out["model"]
    count = model_param_floor(model)
    if count > MAX_MODEL_PARAMS:
        raise experiment_config.ExperimentError(
            [
                {
                    "loc": ["model", "width"],
                    "msg": f"a {model['arch']} of depth {model['depth']} and width "
                    f"{model['width']} has at least {count:,} parameters; the limit is "
                    f"{MAX_MODEL_PARAMS:,}: lower the depth or the width",
                }
            ]
        )
    return out


def __getattr__(name: str) -> Any:
    if name in _EXPERIMENT_NAMES:
        from layerscope.trainer import experiment_config

        return getattr(experiment_config, name)
    raise AttributeError(f"module 'layerscope.trainer.wire' has no attribute {name!r}")
