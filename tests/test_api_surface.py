"""Guards the public API against silent removals, with tests/api_surface.json as the inventory.

The inventory records every name of ``sed_discriminator.__all__``, its kind and the parameter
names of its signature (constructor for classes). A test fails when a recorded name disappears,
changes kind or loses a recorded parameter; adding names or parameters is fine, but new names
must be added to the inventory (review the change, then regenerate it with
``python tests/test_api_surface.py --update``).
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
    params = [p for p in inspect.signature(target).parameters if p != "self"]
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
    lost = [p for p in recorded.get("parameters", []) if p not in now.get("parameters", [])]
    assert not lost, f"{name} lost parameters {lost}"


def test_new_names_are_inventoried() -> None:
    new = sorted(set(sed_discriminator.__all__) - set(load_inventory()))
    assert not new, f"new public names {new}: review them and run `python tests/test_api_surface.py --update`"


def test_version_string() -> None:
    parts = sed_discriminator.__version__.split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts[:2])


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    INVENTORY.write_text(json.dumps(current_surface(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {INVENTORY}")
