"""Language codes: one table, one canonical form.

Every language code that enters vlm (a shard's ``json["lang"]``, a key of ``json["captions"]``, a mixing
weight, a Babel-ImageNet file key, a ``--lang`` flag) goes through :func:`normalize_lang`, so that "DE",
"de", "de-DE", "de_DE", "deu", "ger" and "deu_Latn" are all the one code ``"de"``.

Canonical form
    lower-case ISO 639-1 (two letters) where the language has one, else lower-case ISO 639-3 (three
    letters: ``yue``, ``fil``, ``ceb``, ``quz`` ...).

What :func:`normalize_lang` accepts
    - any case, surrounding blanks;
    - BCP-47 / POSIX tags: the first subtag is the language, region and script subtags are dropped
      (``de-DE`` -> ``de``, ``zh-Hans`` / ``zh_TW`` -> ``zh``, ``pt-BR`` -> ``pt``, ``sr-Latn`` -> ``sr``);
      the script a caption uses is not a property of its language code in this table;
    - NLLB/FLORES-200 codes (``deu_Latn`` -> ``de``, ``zho_Hant`` -> ``zh``, ``ckb_Arab`` -> ``ckb``);
    - ISO 639-3 and 639-2/T codes of languages that have a 639-1 code (``deu`` -> ``de``), the ten
      639-2/B codes that differ (``ger``, ``fre``, ``chi``, ...), the deprecated 639-1 codes
      still written by some tools (``iw`` -> ``he``, ``in`` -> ``id``, ``ji`` -> ``yi``, ``jw`` -> ``jv``,
      ``mo`` -> ``ro``), and individual-language codes of NLLB whose macrolanguage is the one people
      mean (``pes`` -> ``fa``, ``zsm`` -> ``ms``, ``cmn`` -> ``zh``, ``swh`` -> ``sw``, ...).

An unknown code raises :class:`UnknownLanguage` (a :class:`vlm.errors.UserError`) whose message says
what was given and suggests the nearest codes, or the code of a language *name* that was passed instead
of a code ("German" -> "use 'de'"). Names are never accepted silently: a config holding names is a bug
that must surface.

The table holds all 184 ISO 639-1 codes (``bh`` kept for old data), the common 639-3 codes used by
multilingual datasets (NLLB, XM3600, mC4, Wikipedia) and, checked by a test, all 93 codes of the
Babel-ImageNet files (upper-case there: ``DE`` -> ``de``); :data:`BABEL_IMAGENET_LANGS` lists them. Each
language has an English name and its main script (a Unicode script name: Latin, Cyrillic, Arabic,
Devanagari, Han, Japanese (= Han + Hiragana + Katakana), Hangul, Greek, Hebrew, Thai, Bengali, ...).
Languages written in several scripts list the most common one in current text (``sr`` Cyrillic, ``uz``
Latin, ``pa`` Gurmukhi, ``ku`` Latin (Kurmanji); ``ckb``, Sorani, is Arabic).

Nothing here reads a file at import or call time.
"""
from __future__ import annotations

import difflib
from typing import NamedTuple

from vlm.errors import UserError


class UnknownLanguage(UserError):
    """A language code not in :data:`LANGUAGES` (nor an accepted alias of one)."""


class Language(NamedTuple):
    code: str  # canonical: ISO 639-1 if the language has one, else ISO 639-3
    iso639_3: str
    name: str
    script: str


# (639-1, 639-3, English name, main script) for all ISO 639-1 codes.
_ISO639_1 = [
    ("aa", "aar", "Afar", "Latin"),
    ("ab", "abk", "Abkhazian", "Cyrillic"),
    ("ae", "ave", "Avestan", "Avestan"),
    ("af", "afr", "Afrikaans", "Latin"),
    ("ak", "aka", "Akan", "Latin"),
    ("am", "amh", "Amharic", "Ethiopic"),
    ("an", "arg", "Aragonese", "Latin"),
    ("ar", "ara", "Arabic", "Arabic"),
    ("as", "asm", "Assamese", "Bengali"),
    ("av", "ava", "Avaric", "Cyrillic"),
    ("ay", "aym", "Aymara", "Latin"),
    ("az", "aze", "Azerbaijani", "Latin"),
    ("ba", "bak", "Bashkir", "Cyrillic"),
    ("be", "bel", "Belarusian", "Cyrillic"),
    ("bg", "bul", "Bulgarian", "Cyrillic"),
    ("bh", "bih", "Bihari", "Devanagari"),
    ("bi", "bis", "Bislama", "Latin"),
    ("bm", "bam", "Bambara", "Latin"),
    ("bn", "ben", "Bengali", "Bengali"),
    ("bo", "bod", "Tibetan", "Tibetan"),
    ("br", "bre", "Breton", "Latin"),
    ("bs", "bos", "Bosnian", "Latin"),
    ("ca", "cat", "Catalan", "Latin"),
    ("ce", "che", "Chechen", "Cyrillic"),
    ("ch", "cha", "Chamorro", "Latin"),
    ("co", "cos", "Corsican", "Latin"),
    ("cr", "cre", "Cree", "Canadian Aboriginal"),
    ("cs", "ces", "Czech", "Latin"),
    ("cu", "chu", "Church Slavonic", "Cyrillic"),
    ("cv", "chv", "Chuvash", "Cyrillic"),
    ("cy", "cym", "Welsh", "Latin"),
    ("da", "dan", "Danish", "Latin"),
    ("de", "deu", "German", "Latin"),
    ("dv", "div", "Dhivehi", "Thaana"),
    ("dz", "dzo", "Dzongkha", "Tibetan"),
    ("ee", "ewe", "Ewe", "Latin"),
    ("el", "ell", "Greek", "Greek"),
    ("en", "eng", "English", "Latin"),
    ("eo", "epo", "Esperanto", "Latin"),
    ("es", "spa", "Spanish", "Latin"),
    ("et", "est", "Estonian", "Latin"),
    ("eu", "eus", "Basque", "Latin"),
    ("fa", "fas", "Persian", "Arabic"),
    ("ff", "ful", "Fulah", "Latin"),
    ("fi", "fin", "Finnish", "Latin"),
    ("fj", "fij", "Fijian", "Latin"),
    ("fo", "fao", "Faroese", "Latin"),
    ("fr", "fra", "French", "Latin"),
    ("fy", "fry", "Western Frisian", "Latin"),
    ("ga", "gle", "Irish", "Latin"),
    ("gd", "gla", "Scottish Gaelic", "Latin"),
    ("gl", "glg", "Galician", "Latin"),
    ("gn", "grn", "Guarani", "Latin"),
    ("gu", "guj", "Gujarati", "Gujarati"),
    ("gv", "glv", "Manx", "Latin"),
    ("ha", "hau", "Hausa", "Latin"),
    ("he", "heb", "Hebrew", "Hebrew"),
    ("hi", "hin", "Hindi", "Devanagari"),
    ("ho", "hmo", "Hiri Motu", "Latin"),
    ("hr", "hrv", "Croatian", "Latin"),
    ("ht", "hat", "Haitian Creole", "Latin"),
    ("hu", "hun", "Hungarian", "Latin"),
    ("hy", "hye", "Armenian", "Armenian"),
    ("hz", "her", "Herero", "Latin"),
    ("ia", "ina", "Interlingua", "Latin"),
    ("id", "ind", "Indonesian", "Latin"),
    ("ie", "ile", "Interlingue", "Latin"),
    ("ig", "ibo", "Igbo", "Latin"),
    ("ii", "iii", "Sichuan Yi", "Yi"),
    ("ik", "ipk", "Inupiaq", "Latin"),
    ("io", "ido", "Ido", "Latin"),
    ("is", "isl", "Icelandic", "Latin"),
    ("it", "ita", "Italian", "Latin"),
    ("iu", "iku", "Inuktitut", "Canadian Aboriginal"),
    ("ja", "jpn", "Japanese", "Japanese"),
    ("jv", "jav", "Javanese", "Latin"),
    ("ka", "kat", "Georgian", "Georgian"),
    ("kg", "kon", "Kongo", "Latin"),
    ("ki", "kik", "Kikuyu", "Latin"),
    ("kj", "kua", "Kuanyama", "Latin"),
    ("kk", "kaz", "Kazakh", "Cyrillic"),
    ("kl", "kal", "Kalaallisut", "Latin"),
    ("km", "khm", "Khmer", "Khmer"),
    ("kn", "kan", "Kannada", "Kannada"),
    ("ko", "kor", "Korean", "Hangul"),
    ("kr", "kau", "Kanuri", "Latin"),
    ("ks", "kas", "Kashmiri", "Arabic"),
    ("ku", "kur", "Kurdish", "Latin"),
    ("kv", "kom", "Komi", "Cyrillic"),
    ("kw", "cor", "Cornish", "Latin"),
    ("ky", "kir", "Kyrgyz", "Cyrillic"),
    ("la", "lat", "Latin", "Latin"),
    ("lb", "ltz", "Luxembourgish", "Latin"),
    ("lg", "lug", "Ganda", "Latin"),
    ("li", "lim", "Limburgish", "Latin"),
    ("ln", "lin", "Lingala", "Latin"),
    ("lo", "lao", "Lao", "Lao"),
    ("lt", "lit", "Lithuanian", "Latin"),
    ("lu", "lub", "Luba-Katanga", "Latin"),
    ("lv", "lav", "Latvian", "Latin"),
    ("mg", "mlg", "Malagasy", "Latin"),
    ("mh", "mah", "Marshallese", "Latin"),
    ("mi", "mri", "Maori", "Latin"),
    ("mk", "mkd", "Macedonian", "Cyrillic"),
    ("ml", "mal", "Malayalam", "Malayalam"),
    ("mn", "mon", "Mongolian", "Cyrillic"),
    ("mr", "mar", "Marathi", "Devanagari"),
    ("ms", "msa", "Malay", "Latin"),
    ("mt", "mlt", "Maltese", "Latin"),
    ("my", "mya", "Burmese", "Myanmar"),
    ("na", "nau", "Nauru", "Latin"),
    ("nb", "nob", "Norwegian Bokmal", "Latin"),
    ("nd", "nde", "North Ndebele", "Latin"),
    ("ne", "nep", "Nepali", "Devanagari"),
    ("ng", "ndo", "Ndonga", "Latin"),
    ("nl", "nld", "Dutch", "Latin"),
    ("nn", "nno", "Norwegian Nynorsk", "Latin"),
    ("no", "nor", "Norwegian", "Latin"),
    ("nr", "nbl", "South Ndebele", "Latin"),
    ("nv", "nav", "Navajo", "Latin"),
    ("ny", "nya", "Chichewa", "Latin"),
    ("oc", "oci", "Occitan", "Latin"),
    ("oj", "oji", "Ojibwe", "Canadian Aboriginal"),
    ("om", "orm", "Oromo", "Latin"),
    ("or", "ori", "Odia", "Oriya"),
    ("os", "oss", "Ossetian", "Cyrillic"),
    ("pa", "pan", "Punjabi", "Gurmukhi"),
    ("pi", "pli", "Pali", "Devanagari"),
    ("pl", "pol", "Polish", "Latin"),
    ("ps", "pus", "Pashto", "Arabic"),
    ("pt", "por", "Portuguese", "Latin"),
    ("qu", "que", "Quechua", "Latin"),
    ("rm", "roh", "Romansh", "Latin"),
    ("rn", "run", "Kirundi", "Latin"),
    ("ro", "ron", "Romanian", "Latin"),
    ("ru", "rus", "Russian", "Cyrillic"),
    ("rw", "kin", "Kinyarwanda", "Latin"),
    ("sa", "san", "Sanskrit", "Devanagari"),
    ("sc", "srd", "Sardinian", "Latin"),
    ("sd", "snd", "Sindhi", "Arabic"),
    ("se", "sme", "Northern Sami", "Latin"),
    ("sg", "sag", "Sango", "Latin"),
    ("si", "sin", "Sinhala", "Sinhala"),
    ("sk", "slk", "Slovak", "Latin"),
    ("sl", "slv", "Slovenian", "Latin"),
    ("sm", "smo", "Samoan", "Latin"),
    ("sn", "sna", "Shona", "Latin"),
    ("so", "som", "Somali", "Latin"),
    ("sq", "sqi", "Albanian", "Latin"),
    ("sr", "srp", "Serbian", "Cyrillic"),
    ("ss", "ssw", "Swati", "Latin"),
    ("st", "sot", "Southern Sotho", "Latin"),
    ("su", "sun", "Sundanese", "Latin"),
    ("sv", "swe", "Swedish", "Latin"),
    ("sw", "swa", "Swahili", "Latin"),
    ("ta", "tam", "Tamil", "Tamil"),
    ("te", "tel", "Telugu", "Telugu"),
    ("tg", "tgk", "Tajik", "Cyrillic"),
    ("th", "tha", "Thai", "Thai"),
    ("ti", "tir", "Tigrinya", "Ethiopic"),
    ("tk", "tuk", "Turkmen", "Latin"),
    ("tl", "tgl", "Tagalog", "Latin"),
    ("tn", "tsn", "Tswana", "Latin"),
    ("to", "ton", "Tongan", "Latin"),
    ("tr", "tur", "Turkish", "Latin"),
    ("ts", "tso", "Tsonga", "Latin"),
    ("tt", "tat", "Tatar", "Cyrillic"),
    ("tw", "twi", "Twi", "Latin"),
    ("ty", "tah", "Tahitian", "Latin"),
    ("ug", "uig", "Uyghur", "Arabic"),
    ("uk", "ukr", "Ukrainian", "Cyrillic"),
    ("ur", "urd", "Urdu", "Arabic"),
    ("uz", "uzb", "Uzbek", "Latin"),
    ("ve", "ven", "Venda", "Latin"),
    ("vi", "vie", "Vietnamese", "Latin"),
    ("vo", "vol", "Volapuk", "Latin"),
    ("wa", "wln", "Walloon", "Latin"),
    ("wo", "wol", "Wolof", "Latin"),
    ("xh", "xho", "Xhosa", "Latin"),
    ("yi", "yid", "Yiddish", "Hebrew"),
    ("yo", "yor", "Yoruba", "Latin"),
    ("za", "zha", "Zhuang", "Latin"),
    ("zh", "zho", "Chinese", "Han"),
    ("zu", "zul", "Zulu", "Latin"),
]

# Languages without a 639-1 code that multilingual datasets use: (639-3, name, main script).
_ISO639_3_ONLY = [
    ("ace", "Acehnese", "Latin"), ("acm", "Mesopotamian Arabic", "Arabic"),
    ("aeb", "Tunisian Arabic", "Arabic"), ("als", "Tosk Albanian", "Latin"),
    ("apc", "Levantine Arabic", "Arabic"), ("ars", "Najdi Arabic", "Arabic"),
    ("ary", "Moroccan Arabic", "Arabic"), ("arz", "Egyptian Arabic", "Arabic"),
    ("ast", "Asturian", "Latin"), ("awa", "Awadhi", "Devanagari"), ("azb", "South Azerbaijani", "Arabic"),
    ("ban", "Balinese", "Latin"), ("bem", "Bemba", "Latin"), ("bho", "Bhojpuri", "Devanagari"),
    ("bjn", "Banjar", "Latin"), ("brx", "Bodo", "Devanagari"), ("bug", "Buginese", "Latin"),
    ("ceb", "Cebuano", "Latin"), ("ckb", "Central Kurdish", "Arabic"), ("crh", "Crimean Tatar", "Latin"),
    ("dik", "Dinka", "Latin"), ("doi", "Dogri", "Devanagari"), ("dsb", "Lower Sorbian", "Latin"),
    ("dyu", "Dyula", "Latin"), ("fil", "Filipino", "Latin"), ("fon", "Fon", "Latin"),
    ("fur", "Friulian", "Latin"), ("gom", "Goan Konkani", "Devanagari"), ("hak", "Hakka Chinese", "Han"),
    ("haw", "Hawaiian", "Latin"), ("hmn", "Hmong", "Latin"), ("hne", "Chhattisgarhi", "Devanagari"),
    ("hsb", "Upper Sorbian", "Latin"), ("ilo", "Ilocano", "Latin"), ("kab", "Kabyle", "Latin"),
    ("kac", "Jingpho", "Latin"), ("kam", "Kamba", "Latin"), ("kbp", "Kabiye", "Latin"),
    ("kea", "Kabuverdianu", "Latin"), ("kmb", "Kimbundu", "Latin"), ("kmr", "Northern Kurdish", "Latin"),
    ("knc", "Central Kanuri", "Arabic"), ("kok", "Konkani", "Devanagari"), ("lij", "Ligurian", "Latin"),
    ("lmo", "Lombard", "Latin"), ("ltg", "Latgalian", "Latin"), ("lua", "Luba-Lulua", "Latin"),
    ("luo", "Luo", "Latin"), ("lus", "Mizo", "Latin"), ("mag", "Magahi", "Devanagari"),
    ("mai", "Maithili", "Devanagari"), ("min", "Minangkabau", "Latin"), ("mni", "Manipuri", "Bengali"),
    ("mos", "Mossi", "Latin"), ("nan", "Min Nan Chinese", "Han"), ("nds", "Low German", "Latin"),
    ("nso", "Northern Sotho", "Latin"), ("nus", "Nuer", "Latin"), ("pag", "Pangasinan", "Latin"),
    ("pam", "Pampanga", "Latin"), ("pap", "Papiamento", "Latin"), ("prs", "Dari", "Arabic"),
    ("quy", "Ayacucho Quechua", "Latin"), ("quz", "Cusco Quechua", "Latin"), ("sah", "Yakut", "Cyrillic"),
    ("sat", "Santali", "Ol Chiki"), ("scn", "Sicilian", "Latin"), ("shn", "Shan", "Myanmar"),
    ("szl", "Silesian", "Latin"), ("taq", "Tamasheq", "Latin"), ("tet", "Tetum", "Latin"),
    ("tpi", "Tok Pisin", "Latin"), ("tum", "Tumbuka", "Latin"), ("tzm", "Central Atlas Tamazight", "Tifinagh"),
    ("udm", "Udmurt", "Cyrillic"), ("umb", "Umbundu", "Latin"), ("vec", "Venetian", "Latin"),
    ("war", "Waray", "Latin"), ("wuu", "Wu Chinese", "Han"), ("yue", "Cantonese", "Han"),
    ("zgh", "Standard Moroccan Tamazight", "Tifinagh"),
]

# Other spellings -> canonical code: 639-2/B codes, deprecated 639-1 codes, and NLLB individual-language
# codes whose macrolanguage carries the 639-1 code.
_ALIASES = {
    # ISO 639-2/B (bibliographic) codes that differ from 639-2/T
    "alb": "sq", "arm": "hy", "baq": "eu", "bur": "my", "chi": "zh", "cze": "cs", "dut": "nl", "fre": "fr",
    "geo": "ka", "ger": "de", "gre": "el", "ice": "is", "mac": "mk", "mao": "mi", "may": "ms", "per": "fa",
    "rum": "ro", "slo": "sk", "tib": "bo", "wel": "cy",
    # deprecated ISO 639-1 codes still emitted by some tools (e.g. Google's "iw")
    "iw": "he", "in": "id", "ji": "yi", "jw": "jv", "mo": "ro",
    # individual languages (NLLB/FLORES-200) -> their macrolanguage's 639-1 code
    "azj": "az", "cmn": "zh", "ekk": "et", "gaz": "om", "khk": "mn", "lvs": "lv", "npi": "ne", "ory": "or",
    "pbt": "ps", "pes": "fa", "plt": "mg", "swh": "sw", "uzn": "uz", "ydd": "yi", "zsm": "ms",
    "nob": "nb", "nno": "nn",
}

# The 93 language codes of the Babel-ImageNet files (upper-case there), lower-cased.
BABEL_IMAGENET_LANGS: tuple[str, ...] = (
    "af", "am", "ar", "as", "az", "be", "bg", "bn", "br", "bs", "ca", "cs", "cy", "da", "de", "el", "en",
    "eo", "es", "et", "eu", "fa", "fi", "fr", "fy", "ga", "gd", "gl", "gu", "ha", "he", "hi", "hr", "hu",
    "hy", "id", "is", "it", "ja", "jv", "ka", "kk", "km", "kn", "ko", "ku", "ky", "la", "lo", "lt", "lv",
    "mg", "mk", "ml", "mn", "mr", "ms", "my", "ne", "nl", "no", "om", "or", "pa", "pl", "ps", "pt", "ro",
    "ru", "sa", "sd", "si", "sk", "sl", "so", "sq", "sr", "su", "sv", "sw", "ta", "te", "th", "tl", "tr",
    "ug", "uk", "ur", "uz", "vi", "xh", "yi", "zh",
)

LANGUAGES: dict[str, Language] = {c: Language(c, c3, n, s) for c, c3, n, s in _ISO639_1}
LANGUAGES.update({c3: Language(c3, c3, n, s) for c3, n, s in _ISO639_3_ONLY})

# every accepted spelling (lower-case) -> canonical code
_LOOKUP: dict[str, str] = {c: c for c in LANGUAGES}
_LOOKUP.update({lang.iso639_3: c for c, lang in LANGUAGES.items()})
_LOOKUP.update(_ALIASES)
_BY_NAME: dict[str, str] = {lang.name.lower(): c for c, lang in LANGUAGES.items()}

SCRIPTS: tuple[str, ...] = tuple(sorted({lang.script for lang in LANGUAGES.values()}))


def _lookup(code: str) -> str | None:
    key = code.strip().lower().replace("_", "-")
    if key in _LOOKUP:
        return _LOOKUP[key]
    head = key.split("-", 1)[0]  # BCP-47 "de-de", "zh-hans"; NLLB "deu-latn"
    return _LOOKUP.get(head) if head else None


def normalize_lang(code: str) -> str:
    """Canonical lower-case code of ``code`` ("DE", "de-DE", "zh-Hans", "deu_Latn", "ger" -> ...).

    Raises :class:`UnknownLanguage` naming the code, with the nearest known codes as a hint."""
    if not isinstance(code, str):
        raise UnknownLanguage(f"language code must be a string, got {type(code).__name__} {code!r}")
    found = _lookup(code)
    if found is not None:
        return found
    raise UnknownLanguage(f"unknown language code {code!r}; {_hint(code)}")


def is_known(code: str) -> bool:
    """True if :func:`normalize_lang` accepts ``code``."""
    return isinstance(code, str) and _lookup(code) is not None


def script_of(code: str) -> str:
    """Main script of the language (e.g. "Latin", "Cyrillic", "Han", "Devanagari")."""
    return LANGUAGES[normalize_lang(code)].script


def lang_name(code: str) -> str:
    """English name of the language ("de" -> "German")."""
    return LANGUAGES[normalize_lang(code)].name


def lang_info(code: str) -> Language:
    """The table row: ``Language(code, iso639_3, name, script)``."""
    return LANGUAGES[normalize_lang(code)]


def langs_with_script(script: str) -> list[str]:
    """Canonical codes whose main script is ``script`` (case-insensitive), sorted."""
    want = script.strip().lower()
    out = sorted(c for c, lang in LANGUAGES.items() if lang.script.lower() == want)
    if not out:
        raise UnknownLanguage(f"unknown script {script!r}; known scripts: {', '.join(SCRIPTS)}")
    return out


def _hint(code: str) -> str:
    key = code.strip().lower()
    if key in _BY_NAME:
        return f"{code!r} is a language name: use its code {_BY_NAME[key]!r}"
    near = difflib.get_close_matches(key, list(_LOOKUP), n=3, cutoff=0.6)
    near_names = difflib.get_close_matches(key, list(_BY_NAME), n=2, cutoff=0.75)
    tips = [f"{_LOOKUP[n]!r} ({LANGUAGES[_LOOKUP[n]].name})" for n in near]
    tips += [f"{_BY_NAME[n]!r} ({LANGUAGES[_BY_NAME[n]].name})" for n in near_names]
    tips = list(dict.fromkeys(tips))
    base = "use an ISO 639-1 code (e.g. 'de') or ISO 639-3 code (e.g. 'yue'); see vlm.data.langs.LANGUAGES"
    return (f"did you mean {', '.join(tips)}? " if tips else "") + base
