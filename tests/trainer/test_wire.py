"""wire's probe validation: the whole-frame fast path accepts, refuses and normalises
exactly as the field-by-field path does (the server runs the fast one on every frame)."""

from __future__ import annotations

import copy
import json
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
        assert outcome(wire.parse_trainer_frame, text) == expected_text, (path, value)


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
