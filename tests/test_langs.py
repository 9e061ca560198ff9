"""vlm.data.langs on the langcodes library: distinct languages stay distinct, real codes are known,
the project's codes are stable, and BCP-47 / POSIX / ISO 639-2/3 spellings are accepted."""
import pytest

from vlm.data import langs
from vlm.data.langs import UnknownLanguage, is_known, lang_name, normalize_lang as n, script_of

DEMO = "en de fr es ru uk ar fa hi mr zh ja ko el he th".split()


def test_demo_languages_are_stable():
    assert [n(c) for c in DEMO] == DEMO
    assert [n(c.upper()) for c in DEMO] == DEMO
    assert [lang_name(c) for c in ("en", "de", "zh", "ja", "el", "fa")] == [
        "English", "German", "Chinese", "Japanese", "Greek", "Persian"]
    assert {c: script_of(c) for c in ("ru", "ar", "hi", "zh", "ja", "ko", "he", "th")} == {
        "ru": "Cyrillic", "ar": "Arabic", "hi": "Devanagari", "zh": "Han", "ja": "Japanese", "ko": "Hangul",
        "he": "Hebrew", "th": "Thai"}


def test_merged_languages_are_now_distinct():
    assert n("zh_yue") == "yue" and n("ZH_MIN_NAN") == "nan" and n("zh_classical") == "lzh"
    assert n("be_x_old") == "be-tarask" and n("nds_nl") == "nds-NL"
    assert len({n(c) for c in ("zh", "zh_yue", "zh_min_nan", "zh_classical", "be", "be_x_old", "nds", "nds_nl")}) == 8
    assert lang_name("yue") == "Cantonese" and script_of("be_x_old") == "Cyrillic"
    assert n("tl") == "tl" and n("fil") == "fil" and n("sh") == "sh" and n("prs") == "prs"  # CLDR would merge


def test_iso639_2_and_3_codes():
    assert [n(c) for c in ("deu", "ger", "DEU", "fre", "chi", "iw", "in")] == ["de", "de", "de", "fr", "zh", "he", "id"]
    assert [n(c) for c in ("ach", "son", "shs", "ACH")] == ["ach", "son", "shs", "ach"]
    assert lang_name("ach") == "Acoli" and lang_name("shs") == "Shuswap" and script_of("son") == "Latin"
    assert n("cmn") == "zh" and n("pes_Arab") == "fa" and n("arb_Arab") == "ar" and n("kmr") == "kmr"


def test_bcp47_tags_and_posix_locales():
    assert [n(c) for c in ("pt-BR", "pt_BR.utf8", "de_DE.UTF-8", "de_AT", "en-GB", "de_DE@euro")] == [
        "pt", "pt", "de", "de", "en", "de"]
    assert n("zh-Hans") == n("zh_CN") == "zh"
    assert n("zh-Hant") == n("zh_TW") == n("zh-HK") == n("zho_Hant") == "zh-Hant"  # a script that is not zh's usual
    assert n("sr-Latn") == n("sr@latin") == n("sr_RS@latin") == "sr-Latn" and n("sr-Cyrl") == "sr"
    assert n("ca@valencia") == "ca-valencia" and n("pa-PK") == "pa-Arab" and n("de-u-co-phonebk") == "de"
    assert script_of("zh-Hant") == "Han" and script_of("sr-Latn") == "Latin" and script_of("pa-PK") == "Arabic"
    assert lang_name("zh-Hant") == "Chinese (Traditional)"


def test_unknown_codes_raise_with_a_hint():
    with pytest.raises(UnknownLanguage, match="use its code 'de'"):
        n("German")
    for bad in ("zz", "xx-yy-zz", "und", "zxx", "qaa", "x-foo", "", "12", "ca@nosuchvariant"):
        with pytest.raises(UnknownLanguage, match="unknown language code"):
            n(bad)
        assert not is_known(bad)
    with pytest.raises(UnknownLanguage, match="did you mean"):
        n("deuu")
    with pytest.raises(UnknownLanguage, match="string"):
        n(None)


def test_babel_imagenet_298_all_known_distinct_and_idempotent():
    assert len(langs.BABEL_IMAGENET_298) == 298
    canon = [n(c) for c in langs.BABEL_IMAGENET_298]
    assert len(set(canon)) == 298  # no two Babel-ImageNet languages merged
    assert all(n(c.upper()) == c for c in langs.BABEL_IMAGENET_LANGS)
    assert all(n(c) == c for c in canon) and all(n(c) == c for c in langs.LANGUAGES)
    assert {c: n(c) for c in ("BAT_SMG", "FIU_VRO", "ROA_RUP", "SIMPLE", "GMQ_BOT", "EML")} == {
        "BAT_SMG": "sgs", "FIU_VRO": "vro", "ROA_RUP": "rup", "SIMPLE": "en-x-simple", "GMQ_BOT": "gmq-x-bot",
        "EML": "eml"}


def test_catalogue_scripts_and_names():
    assert {n(c) for c in langs.BABEL_IMAGENET_298} <= set(langs.LANGUAGES)
    assert all(info.script != "Unknown" and info.name for info in langs.LANGUAGES.values())
    assert "hi" in langs.langs_with_script("devanagari") and "yue" in langs.langs_with_script("Han")
    assert langs.lang_info("de").iso639_3 == "deu" and langs.lang_info("sh").iso639_3 == "hbs"
    with pytest.raises(UnknownLanguage, match="unknown script"):
        langs.langs_with_script("Klingon")
