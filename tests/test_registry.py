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


def _fresh(monkeypatch, kind: str, modules: list[str]) -> None:
    """Make ``kind`` list exactly ``modules`` and forget what was loaded for them."""
    monkeypatch.setitem(registry._FAMILY_MODULES, kind, modules)
    monkeypatch.setattr(registry, "_loaded", set(registry._loaded) - set(modules))
    monkeypatch.setattr(registry, "_import_errors", dict(registry._import_errors))


def test_every_listed_family_module_exists():
    import importlib.util

    for kind, mods in registry._FAMILY_MODULES.items():
        for mod in mods:
            assert importlib.util.find_spec(mod) is not None, f"{kind}: {mod} is listed but does not exist"


def test_a_listed_module_that_does_not_exist_is_an_error(monkeypatch):
    _fresh(monkeypatch, "adapter", ["vlm.adapters.no_such_family"])
    with pytest.raises(registry.RegistryError, match="vlm.adapters.no_such_family.*_FAMILY_MODULES"):
        registry.available("adapter")
    with pytest.raises(registry.RegistryError):  # not remembered as loaded: the second lookup fails too
        build("adapter", "lora")


def test_a_missing_third_party_dependency_is_reported_as_unavailable(monkeypatch, tmp_path):
    (tmp_path / "_vlm_fam_needs_pkg.py").write_text("import no_such_pkg_for_vlm_tests\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _fresh(monkeypatch, "adapter", ["_vlm_fam_needs_pkg"])
    registry.available("adapter")  # no error: the family is only unavailable
    assert "_vlm_fam_needs_pkg" in registry._import_errors
    with pytest.raises(SpecError, match="Not available here: _vlm_fam_needs_pkg .missing dependency.*"
                                        "no_such_pkg_for_vlm_tests"):
        build("adapter", "needs_pkg:x")


def test_a_missing_vlm_module_inside_a_family_is_raised(monkeypatch, tmp_path):
    (tmp_path / "_vlm_fam_broken.py").write_text("import vlm.no_such_core_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _fresh(monkeypatch, "adapter", ["_vlm_fam_broken"])
    with pytest.raises(ModuleNotFoundError, match="vlm.no_such_core_module"):
        registry.available("adapter")
