"""Guards the public API against silent removals, with tests/api_surface.json as the inventory.

The inventory records every name of ``sed_discriminator.__all__``, its kind and its signature
(constructor for classes): each parameter's name and kind (positional, keyword-only, ...) in
order. A test fails when a recorded name disappears or changes kind, or when a signature changes
in any way (a parameter added, removed, reordered, or made positional or keyword-only), so
every such change is visible in review: review it, then regenerate the inventory with
``python tests/test_api_surface.py --update``.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest

import sed_discriminator

INVENTORY = Path(__file__).with_name("api_surface.json")


def describe(obj: object) -> dict:
    if inspect.isclass(obj):
        kind, target = "class", obj.__init__
    elif callable(obj):
        kind, target = "function", obj
    else:
        return {"kind": type(obj).__name__}
    params = [[p.name, p.kind.name] for p in inspect.signature(target).parameters.values() if p.name != "self"]
    return {"kind": kind, "parameters": params}


def current_surface() -> dict[str, dict]:
    return {name: describe(getattr(sed_discriminator, name)) for name in sorted(sed_discriminator.__all__)}


def load_inventory() -> dict[str, dict]:
    return json.loads(INVENTORY.read_text(encoding="utf-8"))


def _inventoried_names() -> list[str]:
    return sorted(load_inventory()) if INVENTORY.exists() else []


def test_inventory_exists_and_is_not_empty() -> None:
    assert INVENTORY.exists(), f"{INVENTORY} is missing; create it with `python tests/test_api_surface.py --update`"
    assert load_inventory()


def test_all_names_resolve() -> None:
    assert len(set(sed_discriminator.__all__)) == len(sed_discriminator.__all__)
    for name in sed_discriminator.__all__:
        assert hasattr(sed_discriminator, name), name


@pytest.mark.parametrize("name", _inventoried_names())
def test_recorded_name_still_public(name: str) -> None:
    recorded = load_inventory()[name]
    assert name in sed_discriminator.__all__, f"public name {name!r} disappeared from sed_discriminator.__all__"
    now = describe(getattr(sed_discriminator, name))
    assert now["kind"] == recorded["kind"], f"{name} changed from a {recorded['kind']} to a {now['kind']}"
    assert now.get("parameters") == recorded.get("parameters"), (
        f"the signature of {name} changed: {now.get('parameters')} (recorded: {recorded.get('parameters')}); "
        "review the change, then run `python tests/test_api_surface.py --update`"
    )


def test_the_inventory_records_order_and_kind() -> None:
    """The check sees a reordered signature and a keyword-only argument made positional."""

    def original(x, semantic=None, *, kind="vanilla"):
        pass

    def reordered(semantic, x=None, *, kind="vanilla"):
        pass

    def positional(x, semantic=None, kind="vanilla"):
        pass

    assert describe(original) != describe(reordered)
    assert describe(original) != describe(positional)
    assert describe(original)["parameters"][2] == ["kind", "KEYWORD_ONLY"]


def test_new_names_are_inventoried() -> None:
    new = sorted(set(sed_discriminator.__all__) - set(load_inventory()))
    assert not new, f"new public names {new}: review them and run `python tests/test_api_surface.py --update`"


def test_version_string() -> None:
    parts = sed_discriminator.__version__.split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts[:2])


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    INVENTORY.write_text(json.dumps(current_surface(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {INVENTORY}")
