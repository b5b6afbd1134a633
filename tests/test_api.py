"""The public namespace: one sorted __all__, every name importable, nothing exported twice or missing."""

import importlib

import streamrl


def test_all_is_sorted_and_matches_the_lazy_exports():
    assert streamrl.__all__ == sorted(streamrl.__all__)
    assert set(streamrl.__all__) == set(streamrl._EXPORTS)


def test_every_public_name_resolves_to_its_module():
    for name in streamrl.__all__:
        value = getattr(streamrl, name)
        assert getattr(importlib.import_module(streamrl._EXPORTS[name]), name) is value


def test_unknown_names_raise_attribute_error():
    try:
        streamrl.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
