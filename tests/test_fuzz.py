"""Property-based fuzzing (hypothesis): whatever a data file or a recipe holds, famtune either
reads it or raises its own one-line error naming the file (and line) or the key; nothing else.

The budget is fixed and derandomized so CI runs the same examples every time; FAMTUNE_FUZZ_EXAMPLES
raises it for a longer local run."""

from __future__ import annotations

import json
import math
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from famtune.data import DataError, read_conversations
from famtune.errors import FamtuneError
from famtune.recipe import Recipe, load_recipe, parse_overrides
from famtune.validate import RULES, check_ranges

EXAMPLES = int(os.environ.get("FAMTUNE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_scalars = (
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)
ROLES = st.sampled_from(["system", "user", "assistant", "bot", "human", "gpt", "", "USER"])
TEXT = st.text(max_size=12) | st.integers() | st.none() | st.lists(st.text(max_size=3), max_size=2)
message = st.fixed_dictionaries({}, optional={"role": ROLES, "content": TEXT, "from": ROLES, "value": TEXT})
turn = st.fixed_dictionaries({}, optional={"system": TEXT, "input": TEXT, "output": TEXT})
# Records close to the four formats, so the fuzzer reaches past format detection into each normaliser.
records = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_values}),
    st.fixed_dictionaries({"conversations": st.lists(message, max_size=4) | json_values}, optional={"system": TEXT}),
    st.fixed_dictionaries({"conversation": st.lists(turn, max_size=3) | json_values}),
    st.fixed_dictionaries(
        {"instruction": TEXT},
        optional={
            "input": TEXT,
            "output": TEXT,
            "system": TEXT,
            "history": json_values | st.lists(st.lists(TEXT, max_size=3), max_size=2),
        },
    ),
    json_values,
)


def _read(payload: bytes, suffix: str, skip: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data" + suffix)
        with open(path, "wb") as f:
            f.write(payload)
        try:
            report = read_conversations(path, skip_bad_records=skip)
        except DataError as exc:
            message = str(exc)
            assert message.startswith(path) and "\n" not in message, message
            if exc.line is not None:
                assert message.startswith(f"{path}:{exc.line}: ")
            return
        except FamtuneError as exc:  # famtune's own, but every data error must name the file
            raise AssertionError(f"data error without the file name: {exc}") from None
        for conv in report.conversations:
            assert conv.source == path and conv.line >= 1
            assert all(
                isinstance(m["content"], str) and m["role"] in ("system", "user", "assistant") for m in conv.messages
            )


@FUZZ
@given(st.lists(records, min_size=1, max_size=5), st.booleans())
def test_jsonl_records_are_read_or_refused_with_file_and_line(rows, skip):
    payload = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8")
    _read(payload, ".jsonl", skip)


@FUZZ
@given(st.lists(records, max_size=5), st.booleans())
def test_json_arrays_are_read_or_refused_with_file_and_line(rows, skip):
    _read(json.dumps(rows, ensure_ascii=False, indent=1).encode("utf-8"), ".json", skip)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".json"]))
def test_arbitrary_bytes_are_read_or_refused_with_file_and_line(payload, suffix):
    _read(payload, suffix, False)


@FUZZ
@given(st.lists(records, min_size=1, max_size=4), st.integers(0, 200), st.binary(min_size=1, max_size=3))
def test_damaged_jsonl_is_read_or_refused_with_file_and_line(rows, cut, junk):
    payload = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8")
    _read(payload[:cut] + junk + payload[cut:], ".jsonl", False)


recipe_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats()
    | st.text(max_size=8)
    | st.lists(st.text(max_size=5) | st.integers(), max_size=3)
)
recipe_keys = st.sampled_from(sorted(Recipe.keys())) | st.text(max_size=12)


@FUZZ
@given(st.dictionaries(recipe_keys, recipe_values, max_size=6))
def test_recipes_load_valid_or_refuse_with_a_one_line_error(values):
    raw = {"model": "m", "data": "d", **values}
    try:
        recipe = load_recipe(None, raw)
    except FamtuneError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("command line: "), str(exc)
        return
    check_ranges(recipe)  # a recipe that loads satisfies every rule
    for key in RULES:
        value = getattr(recipe, key)
        assert not (isinstance(value, float) and not math.isfinite(value)), (key, value)
    assert recipe.grad_accum >= 1 and recipe.batch_size >= 1 and recipe.learning_rate > 0


@FUZZ
@given(st.text(max_size=200))
def test_recipe_files_of_any_text_load_or_refuse_naming_the_file(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.yaml")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        try:
            load_recipe(path)
        except FamtuneError as exc:
            assert str(exc).startswith(path) and "\n" not in str(exc), str(exc)


@FUZZ
@given(st.lists(st.text(max_size=10), max_size=6))
def test_command_line_overrides_parse_or_refuse(argv):
    try:
        parse_overrides(argv)
    except FamtuneError as exc:
        assert "\n" not in str(exc)
