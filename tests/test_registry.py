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


# ------------------------------------------------------------------------------------------------ options
def test_options_are_read_off_the_builders():
    assert registry.options("llm", "hf:/any/dir") == ["add_tokens", "attn_implementation", "device", "dtype",
                                                      "trust_remote_code"]  # forwarded: load_hf_llm(name, **cfg)
    assert "hidden_size" in registry.options("llm", "tiny:llama")
    assert registry.options("projector", "mlp2x_gelu") == ["bias", "frozen", "in_dim", "ln_vision", "out_dim"]
    assert "num_experts" in registry.options("projector", "moe:e4")  # declared by the family
    assert "r" in registry.options("adapter", "lora:r8") and "num_virtual_tokens" in registry.options(
        "adapter", "prompt_tuning:4")
    assert "patch_size" in registry.options("tower", "tiny:vit") and "buckets" in registry.options("tower", "ngram:text")
    assert registry.options("tower", "timm:resnet18") is None  # only timm's class knows: checked while building


@pytest.mark.parametrize("kind,spec,cfg,msg", [
    ("tower", "tiny:vit", {"bogus_kw": 1}, "tower spec 'tiny:vit' has no option 'bogus_kw'; its options are depth"),
    ("projector", "mlp2x_gelu", {"in_dim": 4, "out_dim": 4, "ln_vison": True},
     "has no option 'ln_vison' \\(did you mean 'ln_vision'\\?\\)"),
    ("llm", "tiny:llama", {"bogus": 1}, "llm spec 'tiny:llama' has no option 'bogus'; its options are dtype"),
    ("adapter", "lora", {"rank": 8}, "adapter spec 'lora' has no option 'rank'; its options are alpha"),
    ("tower", "open_clip:RN50", {"side": "image", "bogus": 1}, "has no option 'bogus'; its options are .*vision_cfg"),
])
def test_an_option_the_part_does_not_take_is_one_option_error(kind, spec, cfg, msg):
    with pytest.raises(registry.OptionError, match=msg) as e:
        build(kind, spec, **cfg)
    assert isinstance(e.value, UserError)


def test_check_options_names_the_config_key_and_how_to_reset_it():
    with pytest.raises(registry.OptionError, match="^model.llm_cfg: llm spec 'hf:/d' has no options 'hidden_size', "
                       "'num_layers'; its options are .*reset it with 'model.llm_cfg=\\{\\}'"):
        registry.check_options("llm", "hf:/d", {"hidden_size": 96, "num_layers": 2}, where="model.llm_cfg")
    registry.check_options("llm", "hf:/d", {"dtype": "float32"}, where="model.llm_cfg")  # nothing is built


def test_type_errors_not_about_the_users_options_propagate(monkeypatch):
    class Part:
        def __init__(self, width: int = 2, **kw):
            int("x", bogus=1)  # a bug inside the class, with a keyword the user did not give

    def fam(name, **cfg):
        return Part(**cfg)

    monkeypatch.setitem(registry._families["adapter"], "__p", registry.Entry("adapter", "__p", fam, ""))
    with pytest.raises(TypeError, match="bogus"):
        build("adapter", "__p:x", width=3)
    with pytest.raises(TypeError, match="bogus"):  # even when the user gave that name: the options are unknown,
        build("adapter", "__p:x", bogus=3)          # and int() is not what received the user's options
