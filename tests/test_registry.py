"""Registry mechanics: spec parsing, exact names vs families, unknown specs list what is registered."""
import pytest

from vlm import registry
from vlm.errors import UserError
from vlm.registry import SpecError, build, parse_spec


def test_parse_spec_splits_at_first_colon():
    assert parse_spec("open_clip:ViT-B-32") == ("open_clip", "ViT-B-32")
    assert parse_spec("hf:/some/dir:with:colons") == ("hf", "/some/dir:with:colons")
    assert parse_spec("mlp2x_gelu") == (None, "mlp2x_gelu")
    with pytest.raises(SpecError):
        parse_spec("")


def test_register_family_and_name(monkeypatch):
    monkeypatch.setitem(registry._families["adapter"], "__t", None)  # reserve, then replace below
    registry.register_family("adapter", "__t", examples=("__t:x",))(lambda name, **cfg: ("fam", name, cfg))
    registry.register("adapter", "__exact")(lambda **cfg: ("exact", cfg))
    try:
        assert build("adapter", "__t:abc", r=4) == ("fam", "abc", {"r": 4})
        assert build("adapter", "__exact", r=2) == ("exact", {"r": 2})
        assert any(s.startswith("__t:<name>") for s in registry.available("adapter"))
    finally:
        registry._families["adapter"].pop("__t", None)
        registry._names["adapter"].pop("__exact", None)


def test_unknown_spec_lists_registered():
    with pytest.raises(SpecError) as e:
        build("tower", "nosuchfamily:model")
    assert "nosuchfamily:model" in str(e.value) and "Registered tower specs" in str(e.value)
    assert isinstance(e.value, UserError)


def test_unknown_kind():
    with pytest.raises(SpecError, match="kinds are"):
        build("widget", "tiny:vit")
