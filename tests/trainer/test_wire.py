"""wire's probe validation: the whole-frame fast path accepts, refuses and normalises
exactly as the field-by-field path does (the server runs the fast one on every frame)."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pytest
from layerscope.trainer import wire


def probe(layers: int = 3) -> dict[str, Any]:
    return {
        "type": "probe",
        "v": 1,
        "seq": 7,
        "step": 300,
        "layers": [
            {
                "name": f"blocks.{i}.act",
                **{stat: 0.25 * (i + 1) for stat in wire.PROBE_STATS},
                "saturated_frac": None,
                "hist": {
                    "lo": -2.0,
                    "hi": 2.5,
                    "counts": [(i * 7 + b * 13) % 97 for b in range(16)],
                },
            }
            for i in range(layers)
        ],
    }


def field_by_field(msg: dict[str, Any]) -> dict[str, Any]:
    """What validate_probe returned before the fast path: each layer on its own."""
    layers = [wire._probe_layer(i, layer) for i, layer in enumerate(msg["layers"])]
    return {"type": "probe", "seq": msg["seq"], "step": msg["step"], "layers": layers}


def outcome(fn: Any, arg: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(arg)
    except wire.WireError as exc:
        return "error", str(exc)


def test_a_clean_frame_comes_back_normalised_and_typed() -> None:
    msg = probe()
    msg["layers"][0]["nonfinite"] = 2  # an int stat becomes a float
    del msg["layers"][2]["grad_norm"]  # an absent stat becomes null
    for extra in (False, True):
        if extra:
            msg["layers"][1]["junk"] = "dropped"
        frame = wire.parse_trainer_frame(json.dumps(msg))
        assert frame == field_by_field(msg) == wire.validate_probe(msg)
        first, second, third = frame["layers"]
        assert type(first["nonfinite"]) is float and first["nonfinite"] == 2.0
        assert "junk" not in second and third["grad_norm"] is None
        assert list(first) == list(third) == ["name", *wire.PROBE_STATS, "hist"]
        assert first["hist"] == {
            "lo": -2.0,
            "hi": 2.5,
            "counts": msg["layers"][0]["hist"]["counts"],
        }
        assert list(first["hist"]) == ["lo", "hi", "counts"]


def test_the_output_shares_no_dict_with_the_input() -> None:
    msg = probe()
    frame = wire.validate_probe(msg)
    for given, made in zip(msg["layers"], frame["layers"], strict=True):
        assert made is not given and made["hist"] is not given["hist"]
    msg["layers"][0]["mean"] = 99.0
    msg["layers"][0]["hist"]["lo"] = -99.0
    assert frame["layers"][0]["mean"] == 0.25 and frame["layers"][0]["hist"]["lo"] == -2.0


BAD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**70,
    1.5,
    float("inf"),
    float("nan"),
    "x",
    "",
    [],
    {},
    "n" * 300,
]
PATHS: list[tuple[Any, ...]] = [
    ("name",),
    ("mean",),
    ("nonfinite",),
    ("hist",),
    ("hist", "lo"),
    ("hist", "hi"),
    ("hist", "counts"),
    ("hist", "counts", 0),
    ("hist", "counts", 9),
]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: ".".join(map(str, p)))
def test_every_bad_field_gets_the_field_by_field_answer(path: tuple[Any, ...]) -> None:
    for value in BAD_VALUES:
        msg = probe()
        node = msg["layers"][1]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        expected = outcome(field_by_field, copy.deepcopy(msg))
        assert outcome(wire.validate_probe, copy.deepcopy(msg)) == expected, (path, value)
        try:
            text = json.dumps(msg)
        except ValueError:
            continue
        expected_text = outcome(lambda t: field_by_field(wire.decode(t)), text)
        # as the server receives it (run_id given: every check)
        received = outcome(lambda t: wire.parse_trainer_frame(t, run_id="r"), text)
        assert received == expected_text, (path, value)


def test_refusals_name_the_layer_and_the_field() -> None:
    cases = [
        (("hist", "counts", 3), True, "layers[1].hist.counts must be integers from 0 to"),
        (("hist", "counts", 3), -4, "layers[1].hist.counts must be integers from 0 to"),
        (("hist", "counts", 3), 2.0, "layers[1].hist.counts must be integers from 0 to"),
        (("hist", "counts", 3), 2**64, "layers[1].hist.counts must be integers from 0 to"),
        (("std",), "wide", "layers[1].std must be a number or null, got str"),
        (("name",), "", "layers[1].name must be a non-empty string"),
        (("hist",), [1, 2], "layers[1].hist must be an object or null"),
    ]
    for path, value, message in cases:
        msg = probe()
        node = msg["layers"][1]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(wire.WireError, match=message.replace("[", r"\[").replace("]", r"\]")):
            wire.parse_trainer_frame(json.dumps(msg))
        with pytest.raises(wire.WireError, match=message.replace("[", r"\[").replace("]", r"\]")):
            wire.validate_probe(msg)


def test_too_many_bins_or_layers_are_refused() -> None:
    msg = probe()
    msg["layers"][2]["hist"]["counts"] = [1] * (wire.MAX_BINS + 1)
    with pytest.raises(wire.WireError, match=r"layers\[2\].hist has 1025 bins"):
        wire.parse_trainer_frame(json.dumps(msg))
    msg = probe(layers=1)
    msg["layers"] = msg["layers"] * (wire.MAX_LAYERS + 1)
    with pytest.raises(wire.WireError, match="'layers' has 2049 entries"):
        wire.validate_probe(msg)


def test_non_finite_values_become_null_not_errors() -> None:
    msg = probe()
    msg["layers"][0]["max"] = float("inf")
    msg["layers"][2]["hist"]["hi"] = float("nan")
    frame = wire.validate_probe(msg)
    assert frame == field_by_field(msg)
    assert frame["layers"][0]["max"] is None and frame["layers"][2]["hist"]["hi"] is None


def test_a_name_containing_true_still_takes_the_checked_path() -> None:
    msg = probe()
    msg["layers"][0]["name"] = "construe.true"
    msg["layers"][1]["hist"]["counts"][0] = True
    text = json.dumps(msg)
    with pytest.raises(wire.WireError, match=r"layers\[1\].hist.counts"):
        wire.parse_trainer_frame(text)
    msg["layers"][1]["hist"]["counts"][0] = 1
    assert wire.parse_trainer_frame(json.dumps(msg)) == field_by_field(msg)


def test_an_integer_beyond_float_range_is_stored_as_null_like_inf() -> None:
    """JSON allows integers of any size; one too big for a float is as non-finite as inf:
    null, not an OverflowError that would cost the trainer its connection."""
    msg = probe()
    msg["layers"][1]["std"] = 10**400
    msg["layers"][2]["hist"]["lo"] = -(10**400)
    frame = wire.parse_trainer_frame(json.dumps(msg))
    assert frame == field_by_field(msg)
    assert frame["layers"][1]["std"] is None and frame["layers"][2]["hist"]["lo"] is None
    assert frame["layers"][1]["mean"] == 0.5


def test_counters_past_the_stored_integer_range_are_refused_by_name() -> None:
    """A seq, step or bin count SQLite cannot hold is a clear refusal at the socket, not a
    failure in the store's writer that would drop the batch and the connection."""
    big = wire.MAX_INT + 1
    cases = [
        ({"type": "heartbeat", "v": 1, "step": big}, "'step' must be <="),
        ({**probe(), "seq": big}, "'seq' must be <="),
        ({"type": "metrics", "v": 1, "seq": 1, "rows": [{"step": big, "values": {}}]}, "'step'"),
    ]
    for msg, message in cases:
        with pytest.raises(wire.WireError, match=message):
            wire.parse_trainer_frame(json.dumps(msg))
    ok = {"type": "metrics", "v": 1, "seq": 1, "rows": [{"step": wire.MAX_INT, "values": {}}]}
    assert wire.parse_trainer_frame(json.dumps(ok))["rows"][0]["step"] == wire.MAX_INT


def _outcome(text: str, loads: Any) -> tuple[str, Any]:
    try:
        return ("ok", wire.parse_trainer_frame(text, loads))
    except wire.WireError as exc:
        return ("refused", (str(exc), exc.close_code))


def test_the_servers_fast_decoder_accepts_and_refuses_exactly_as_json_does() -> None:
    """The server decodes frames with orjson (wire.decode's ``loads``); what it refuses is
    handed to json, so every frame gets the same result or the same named error."""
    orjson = pytest.importorskip("orjson")
    metrics = '{"type":"metrics","v":1,"seq":1,"rows":[{"step":1,"values":{"loss":%s}}]}'
    texts = [
        json.dumps(probe(5)),
        json.dumps({**probe(2), "seq": 2**62 - 1}),
        metrics % "0.5",
        metrics % "-0.0",
        metrics % "5e-324",
        metrics % "1.0000000000000002",
        metrics % "1e400",  # a double's overflow: json makes it inf, orjson refuses
        metrics % "NaN",
        metrics % "-Infinity",
        metrics % ("1" + "0" * 400),  # an integer beyond a double's range
        '{"type":"metrics","v":1,"seq":1,"seq":2,"rows":[]}',  # duplicate key: last wins
        '{"type":"event","v":1,"seq":1,"step":1,"kind":"alert","data":{"msg":"\\ud800"}}',
        '{"type":"heartbeat","v":1,"step":3,"status":"running",}',
        '{"type":"heartbeat","v":1,"step":3,"status":"running"} x',
        "[" * 5000 + "]" * 5000,
        '{"a":' * 5000 + "1" + "}" * 5000,
        '"just a string"',
        "{}",
    ]
    for text in texts:
        assert _outcome(text, orjson.loads) == _outcome(text, None), text[:80]


def test_the_one_documented_difference_an_integer_beyond_64_bits_is_refused_either_way() -> None:
    """orjson reads an integer literal past 64 bits as a float: an integer field still
    refuses it, naming the field, where json's path says it is too large."""
    orjson = pytest.importorskip("orjson")
    text = json.dumps({**probe(1), "seq": 2**64})
    with pytest.raises(wire.WireError, match="'seq' must be <="):
        wire.parse_trainer_frame(text)
    with pytest.raises(wire.WireError, match="'seq'"):
        wire.parse_trainer_frame(text, orjson.loads)


def test_a_deeply_nested_frame_is_refused_by_name_not_a_recursion_error() -> None:
    for text in ("[" * 100_000 + "]" * 100_000, '{"type":' * 50_000 + "1" + "}" * 50_000):
        with pytest.raises(wire.WireError, match="nested too deeply"):
            wire.parse_trainer_frame(text)


def test_the_links_fast_encoder_writes_what_json_writes_and_falls_back() -> None:
    """The link encodes with orjson; the text must parse to the same frame as the
    stdlib encoder's (NaN/Inf as null), and what orjson refuses still goes out."""
    from layerscope.trainer.link import encode

    frame = {
        "type": "probe",
        "seq": 3,
        "step": 30,
        "layers": [
            {"name": "fc.0", "mean": 0.25, "std": float("nan"), "max": float("inf"),
             "hist": {"lo": -1e-5, "hi": 3.0, "counts": [1, 0, 2]}, "label": "é"},
        ],
    }  # fmt: skip
    assert json.loads(encode(frame)) == json.loads(wire.encode(frame))
    assert json.loads(encode(frame))["layers"][0]["std"] is None
    odd = {"type": "event", "data": {"big": 2**70, "text": "\ud800"}}  # orjson refuses both
    assert json.loads(encode(odd)) == json.loads(wire.encode(odd))


def test_a_client_command_may_not_claim_to_be_a_rules_action() -> None:
    """A browser's command with source 'rule' was stored and shown as an automatic rule
    action; the server checks clients' commands against CLIENT_COMMAND_SOURCES."""
    spoofed = {"name": "pause", "source": "rule", "reason": "not really"}
    with pytest.raises(wire.WireError, match="source 'rule' is the trainer's own"):
        wire.validate_command(spoofed, sources=wire.CLIENT_COMMAND_SOURCES)
    for source in ("user", "api"):
        cmd = wire.validate_command(
            {"name": "pause", "source": source}, sources=wire.CLIENT_COMMAND_SOURCES
        )
        assert cmd["source"] == source
    assert wire.validate_command(spoofed)["source"] == "rule"  # the trainer's rules make these
    with pytest.raises(wire.WireError, match="unknown command source 'admin'"):
        wire.validate_command({"name": "pause", "source": "admin"})


def test_the_frame_limit_counts_utf8_bytes() -> None:
    """The limit counted characters: 1.9 million two-byte characters (3.8 MB) passed."""

    def frame(pad: str) -> str:
        return json.dumps({"type": "heartbeat", "v": 1, "step": 1, "pad": pad}, ensure_ascii=False)

    overhead = len(frame("").encode())
    fits = frame("\u00e9" * ((wire.MAX_FRAME_BYTES - overhead) // 2))
    assert len(fits.encode()) <= wire.MAX_FRAME_BYTES
    assert wire.decode(fits)["type"] == "heartbeat"
    over = frame("\u00e9" * ((wire.MAX_FRAME_BYTES - overhead) // 2 + 1))
    assert len(over) < wire.MAX_FRAME_BYTES < len(over.encode())
    with pytest.raises(wire.WireError, match=f"frame of {len(over.encode())} bytes exceeds") as exc:
        wire.decode(over)
    assert exc.value.close_code == wire.CLOSE_TOO_BIG
    four = frame("\U0001f600" * (wire.MAX_FRAME_BYTES // 4 + 1))
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode(four)


def test_a_hello_may_name_its_trainer_process_with_a_short_plain_instance() -> None:
    """``instance`` (optional: older trainers and spools have none) is what the server
    tells two processes under one run id apart by; it is a short plain string."""
    hello = {"type": "hello", "v": 1, "run_id": "r1"}
    assert wire.validate_hello(hello)["instance"] is None
    assert wire.validate_hello({**hello, "instance": None})["instance"] is None
    for good in ("9f1c2e3d4b5a69788796a5b4c3d2e1f0", "host-1.pid_42", "x" * wire.MAX_INSTANCE_LEN):
        assert wire.validate_hello({**hello, "instance": good})["instance"] == good
        assert wire.parse_trainer_frame(json.dumps({**hello, "instance": good}))["instance"] == good
    for bad in ("", "x" * (wire.MAX_INSTANCE_LEN + 1), "a b", "a/b", "é", "ab\n", 7, ["a"]):
        with pytest.raises(wire.WireError, match="'instance' must be null or 1-64"):
            wire.validate_hello({**hello, "instance": bad})


def test_a_hello_may_say_it_is_a_spools_upload() -> None:
    """``upload`` (optional): `layerscope sync` says its connection uploads a spool, so the
    server refuses commands nothing on it would apply. A trainer's hello (absent, null,
    false) is not one; anything but a boolean is refused, not read as one."""
    hello = {"type": "hello", "v": 1, "run_id": "r1"}
    assert wire.validate_hello(hello)["upload"] is False
    assert wire.validate_hello({**hello, "upload": None})["upload"] is False
    assert wire.validate_hello({**hello, "upload": False})["upload"] is False
    assert wire.parse_trainer_frame(json.dumps({**hello, "upload": True}))["upload"] is True
    for bad in (1, "true", [True], {}):
        with pytest.raises(wire.WireError, match="'upload' must be true, false or null"):
            wire.validate_hello({**hello, "upload": bad})


def test_a_histogram_range_upside_down_is_refused_as_received_and_read_back_as_stored() -> None:
    msg = probe()
    msg["layers"][1]["hist"]["lo"] = 3.0  # above hi 2.5
    text = json.dumps(msg)
    named = r"layers\[1\].hist.lo \(3.0\) is above layers\[1\].hist.hi \(2.5\)"
    with pytest.raises(wire.WireError, match=named):
        wire.parse_trainer_frame(text, run_id="r")
    with pytest.raises(wire.WireError, match=named):
        wire.validate_probe(msg)
    # A frame stored as wire text before the check is read back through parse_trainer_frame
    # without run_id: it stays readable.
    assert wire.parse_trainer_frame(text)["layers"][1]["hist"]["lo"] == 3.0
    msg["layers"][1]["hist"]["lo"] = 2.5  # a point (every value equal) is a range
    assert wire.parse_trainer_frame(json.dumps(msg), run_id="r") == field_by_field(msg)


def test_a_status_event_must_carry_a_run_status() -> None:
    def event(data: dict[str, Any]) -> str:
        return json.dumps(
            {"type": "event", "v": 1, "seq": 3, "step": 1, "kind": "status", "data": data}
        )

    for data in ({"status": "exploded"}, {}, {"status": None}):
        with pytest.raises(wire.WireError, match="status event: data.status must be one of"):
            wire.parse_trainer_frame(event(data), run_id="r")
        assert wire.parse_trainer_frame(event(data))["data"] == data  # read back as stored
    for status in wire.RUN_STATUSES:
        assert wire.parse_trainer_frame(event({"status": status}), run_id="r")["data"] == {
            "status": status
        }


def test_a_frame_naming_another_run_is_refused_on_the_connection_of_this_one() -> None:
    frame = {"type": "metrics", "v": 1, "seq": 1, "rows": []}
    with pytest.raises(wire.WireError, match="metrics frame names run 'b' but this connection's"):
        wire.parse_trainer_frame(json.dumps({**frame, "run_id": "b"}), run_id="a")
    for same in ({}, {"run_id": "a"}, {"run_id": None}):
        assert wire.parse_trainer_frame(json.dumps({**frame, **same}), run_id="a")["seq"] == 1


def test_a_hellos_device_is_a_string_or_null() -> None:
    hello = {"type": "hello", "run_id": "r", "layers": []}
    assert wire.validate_hello(hello)["device"] == ""
    assert wire.validate_hello({**hello, "device": None})["device"] == ""
    assert wire.validate_hello({**hello, "device": "cuda:0"})["device"] == "cuda:0"
    for bad in ({"type": "cuda"}, 0, ["cpu"], True):
        with pytest.raises(wire.WireError, match="'device' must be a string or null"):
            wire.validate_hello({**hello, "device": bad})


def test_a_config_or_event_data_nested_too_deep_is_refused_by_name() -> None:
    def nested(depth: int) -> dict[str, Any]:
        value: dict[str, Any] = {"x": 1}
        for _ in range(depth - 1):
            value = {"a": value}
        return value

    hello = {"type": "hello", "run_id": "r", "layers": []}
    assert wire.validate_hello({**hello, "config": nested(wire.MAX_DEPTH)})["config"]
    event = {"type": "event", "v": 1, "seq": 2, "step": 1, "kind": "log"}
    assert wire.parse_trainer_frame(
        json.dumps({**event, "data": nested(wire.MAX_DEPTH)}), run_id="r"
    )
    # 500 levels passed the size limit, then raised RecursionError in the walks after it
    for depth in (wire.MAX_DEPTH + 1, 500):
        with pytest.raises(wire.WireError, match="'config' is nested more than 32 levels deep"):
            wire.validate_hello({**hello, "config": nested(depth)})
        with pytest.raises(wire.WireError, match="'data' is nested more than 32 levels deep"):
            wire.parse_trainer_frame(json.dumps({**event, "data": nested(depth)}), run_id="r")
    with pytest.raises(wire.WireError, match="'config' is nested"):
        wire.validate_hello({**hello, "config": {"l": [[[[1]]]] * 2, "deep": [nested(40)]}})


def test_a_commands_reason_is_a_string_not_the_repr_of_whatever_was_sent() -> None:
    assert wire.validate_command({"name": "pause", "reason": "plateau"})["reason"] == "plateau"
    assert "reason" not in wire.validate_command({"name": "pause", "reason": None})
    for bad in ({"a": {"b": 1}}, ["x"], 5):
        with pytest.raises(wire.WireError, match="'reason' must be a string or null"):
            wire.validate_command({"name": "pause", "reason": bad})


def test_an_arg_a_command_does_not_take_is_refused_not_dropped() -> None:
    for msg, named in [
        ({"name": "pause", "args": {"x": 1}}, "pause takes no args; got args.x"),
        (
            {"name": "set_lr_scale", "args": {"valeu": 0.5}},
            "set_lr_scale takes args.value; got args.valeu",
        ),
        (
            {"name": "set_frozen", "args": {"layers": ["fc1"], "frozen": True, "all": True}},
            "set_frozen takes args.layers, args.frozen; got args.all",
        ),
    ]:
        with pytest.raises(wire.WireError, match=named):
            wire.validate_command(msg)
    assert wire.validate_command({"name": "set_lr_scale", "args": {"value": 0.5}})["args"] == {
        "value": 0.5
    }
    assert wire.validate_command({"name": "pause", "args": {}})["args"] == {}


def test_a_layer_named_twice_is_refused_in_a_probe_and_a_hello() -> None:
    msg = probe()
    msg["layers"][2]["name"] = msg["layers"][0]["name"]
    text = json.dumps(msg)
    named = r"layers\[2\].name 'blocks.0.act' repeats layers\[0\].name"
    with pytest.raises(wire.WireError, match=named):
        wire.parse_trainer_frame(text, run_id="r")
    with pytest.raises(wire.WireError, match=named):
        wire.validate_probe(msg)
    assert len(wire.parse_trainer_frame(text)["layers"]) == 3  # read back as stored
    hello = {"type": "hello", "run_id": "r", "layers": [{"name": "fc"}, {"name": "fc"}]}
    with pytest.raises(wire.WireError, match=r"layers\[1\].name 'fc' repeats layers\[0\].name"):
        wire.validate_hello(hello)


def test_an_experiment_over_the_parameter_budget_is_refused_naming_both_counts() -> None:
    """depth 64 x width 4096 (about 1e9 parameters, 12+ GB with adam) was accepted by the
    New-run form and `layerscope train` alike."""
    huge = {"model": {"depth": 64, "width": 4096}, "solver": {"optimizer": "adam"}}
    with pytest.raises(wire.ExperimentError) as refused:
        wire.validate_experiment(huge)
    (error,) = refused.value.errors
    assert error["loc"] == ["model", "width"]
    assert "has at least 1,057,234,945 parameters; the limit is 50,000,000" in error["msg"]
    cnn = {"model": {"arch": "cnn", "depth": 8, "width": 1024}, "data": {"dataset": "digits"}}
    with pytest.raises(wire.ExperimentError, match="a cnn of depth 8 and width 1024"):
        wire.validate_experiment(cnn)
    # The floor counts what the fields alone imply: an mlp of depth 2, width 3 has a 3x3
    # hidden Linear (12), the first layer's 3 weights and 3 biases from one input (6), and a
    # head to one output (3 + 1).
    assert wire.model_param_floor({"arch": "mlp", "depth": 2, "width": 3}) == 22
    assert (
        wire.model_param_floor({"arch": "mlp", "depth": 3, "width": 4096}) < wire.MAX_MODEL_PARAMS
    )
    wire.validate_experiment({"model": {"depth": 2, "width": 4096}})  # the widest, shallow
    wire.validate_experiment(copy.deepcopy(wire.DEMO_EXPERIMENT))


def test_a_lone_surrogate_is_refused_naming_where_and_read_back_escaped() -> None:
    """Python decodes a file name that is not UTF-8 to lone surrogates (os.fsdecode), which
    JSON carries as "\\udce9" and orjson refuses but json accepts: SQLite then refused the
    frame (1011 on every reconnect, the rest of the run lost) or stored a config every
    read failed on. Refused now by decode, naming the string, on both sockets; a pair is
    text; a frame stored before (read back without run_id) comes back escaped."""
    import orjson

    bad = "caf" + os.fsdecode(b"\xe9")
    cases = [
        ({"type": "hello", "run_id": "r", "config": {"data": bad}}, r"config.data holds U\+DCE9"),
        ({"type": "hello", "run_id": "r", "name": bad}, r"name holds U\+DCE9"),
        (
            {"type": "metrics", "seq": 1, "rows": [{"step": 1, "values": {bad: 1.0}}]},
            r"rows\[0\].values key 'caf\\udce9' holds U\+DCE9",
        ),
        (
            {"type": "event", "seq": 1, "step": 1, "kind": "log", "data": {"m": ["ok", "\ud800"]}},
            r"data.m\[1\] holds U\+D800",
        ),
        (
            {"type": "probe", "seq": 1, "step": 1, "layers": [{"name": bad}]},
            r"layers\[0\].name holds U\+DCE9",
        ),
    ]
    for msg, named in cases:
        text = json.dumps(msg)
        assert "\\udce9" in text or "\\ud800" in text
        with pytest.raises(wire.WireError, match=named) as refused:
            wire.parse_trainer_frame(text, orjson.loads, run_id="r")
        assert "which is not valid UTF-8 text" in str(refused.value)
        assert refused.value.close_code is None  # an error frame, as for a bad field
        with pytest.raises(wire.WireError, match=named):
            wire.decode(text)  # the viewer socket's decode, without orjson
    with pytest.raises(wire.WireError, match="holds U"):  # a hello is never read back
        wire.parse_trainer_frame(json.dumps(cases[0][0]), orjson.loads)
    stored = wire.parse_trainer_frame(json.dumps(cases[2][0]), orjson.loads)
    assert stored["rows"][0]["values"] == {"caf\\xe9": 1.0}
    assert wire.decode(json.dumps({"type": "x", "s": "\U0001f600"}))["s"] == "\U0001f600"
    # escaped as os.fsencode(s).decode("utf-8", "backslashreplace") writes a file name
    name = os.fsdecode(b"/data/caf\xe9 \xff.npz")
    assert wire.escape_surrogates(name) == os.fsencode(name).decode("utf-8", "backslashreplace")
    assert wire.escape_surrogates({"k\ud800": ["\udc80"]}) == {"k\\ud800": ["\\x80"]}
    for where, cmd in (
        ("id", {"id": bad, "name": "pause"}),
        ("reason", {"name": "pause", "reason": bad}),
        (r"args.layers\[0\]", {"name": "set_frozen", "args": {"layers": [bad], "frozen": True}}),
    ):
        with pytest.raises(wire.WireError, match=f"{where} holds U\\+DCE9"):
            wire.validate_command(cmd)
    assert "U+DCE9" in (wire.run_id_problem(bad) or "")


def test_an_integer_of_more_than_4300_digits_is_refused_by_name() -> None:
    """json raised a plain ValueError ("Exceeds the limit (4300 digits)") that decode let
    through: the socket dropped with no close frame."""
    import orjson

    digits = "9" * 5000
    for text in (
        '{"type":"hello","v":1,"run_id":"r","last_acked_seq":' + digits + "}",
        '{"type":"command","name":"set_lr_scale","args":{"value":' + digits + "}}",
    ):
        for loads in (orjson.loads, None):
            with pytest.raises(wire.WireError, match="an integer literal of more than 4300 digits"):
                wire.decode(text, loads)
    with pytest.raises(wire.WireError, match="non-standard JSON constant NaN"):
        wire.decode('{"type":"x","v":NaN}')  # still named as before
