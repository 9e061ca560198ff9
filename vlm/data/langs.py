"""Language codes: one canonical form, backed by a maintained code library.

Every language code that enters vlm (a shard's ``json["lang"]``, a key of ``json["captions"]``, a mixing
weight, a ``--lang`` flag) goes through :func:`normalize_lang`, so that "DE", "de", "de-DE", "de_DE.UTF-8",
"deu", "ger" and "deu_Latn" are all the one code ``"de"``.

Library: ``langcodes`` (+ ``language_data`` for names, its ``[data]`` extra). Chosen over ``iso639-lang``,
``python-iso639`` and ``pycountry`` because it is the only one that parses and validates full BCP-47 tags
(language, extlang, script, region, variant, private use) against the IANA subtag registry, knows every
ISO 639-1/2/3 code (and 639-5 collective codes such as ``son``), applies the registry's deprecations
(``iw`` -> ``he``, ``zh-yue`` -> ``yue``, ``zh-min-nan`` -> ``nan``), carries CLDR's likely-subtags data
(the usual script of a language, and that ``zh-TW`` is written in Traditional Han) and CLDR's English
language and script names, and finds a code from a language *name* (used for error hints). It is pure Python
(names: one small compiled dependency, ``marisa-trie``) and reads no file at import (names load on first use).

Canonical form (what :func:`normalize_lang` returns and shards store)
    ``language[-Script][-REGION][-variant...][-x-private]``, where
    - ``language`` is ISO 639-1 where the language has one, else ISO 639-3 / 639-5 (``yue``, ``ach``,
      ``son``, ``lzh``); deprecated and 639-2/B codes are replaced (``iw`` -> ``he``, ``ger`` -> ``de``);
    - ``Script`` is kept only when it is *not* the language's usual script (CLDR likely subtags):
      ``zh-Hans`` -> ``zh``, ``zh-Hant`` / ``zh_TW`` / ``zh-HK`` -> ``zh-Hant``, ``sr-Latn`` / ``sr@latin``
      -> ``sr-Latn``, ``sr-Cyrl`` -> ``sr``, ``pa-PK`` -> ``pa-Arab``; the script decides tokenisation and
      is a real difference between two caption sets, a region usually is not;
    - the region is dropped (``pt-BR``, ``en-GB``, ``de_AT`` -> ``pt``, ``en``, ``de``), except where it
      names a variety that has no code of its own (:data:`_REGION_KEPT`: ``nds-NL``, Dutch Low Saxon);
    - variants and private-use subtags are kept (``be-tarask``, ``ca-valencia``, ``en-x-simple``);
      extensions (``-u-...``, ``-t-...``) are dropped.
    Hence the 16 demo languages (en de fr es ru uk ar fa hi mr zh ja ko el he th) and every bare ISO 639-1
    code normalise to themselves, and ``normalize_lang(normalize_lang(x)) == normalize_lang(x)``.

What :func:`normalize_lang` accepts
    - any case, surrounding blanks, ``_`` or ``-`` as separator (upper-case Babel-ImageNet codes ``DE``);
    - BCP-47 tags (``zh-Hant``, ``pt-BR``, ``sr-Latn``, ``ca-valencia``) and NLLB/FLORES-200 codes
      (``deu_Latn`` -> ``de``, ``zho_Hant`` -> ``zh-Hant``);
    - POSIX locales: the codeset is dropped and the modifier becomes a script (``@latin`` / ``@roman``,
      ``@cyrillic``, ``@devanagari``, ``@olchiki`` ...) or a variant (``ca@valencia`` -> ``ca-valencia``);
      ``@euro`` is dropped: ``de_DE.UTF-8`` -> ``de``, ``pt_BR.utf8`` -> ``pt``, ``sr_RS@latin`` -> ``sr-Latn``;
    - every ISO 639-1, 639-2/T, 639-2/B and 639-3 code the registry knows (``deu``, ``ger``, ``ach``,
      ``son``, ``shs``). With ~8,000 valid three-letter codes, a three-letter typo may be a real code:
      the manifest's per-language counts are where such a mistake shows.

Our own data (only where the library's answer is not the one vlm needs):
    - :data:`_WIKIMEDIA`: Wikipedia/BabelNet codes of the Babel-ImageNet 298-language file that are not
      BCP-47, mapped as MediaWiki maps them (``zh_yue`` -> ``yue``, ``zh_min_nan`` -> ``nan``,
      ``zh_classical`` -> ``lzh``, ``be_x_old`` -> ``be-tarask``, ``nds_nl`` -> ``nds-NL``, ``bat_smg`` ->
      ``sgs``, ``fiu_vro`` -> ``vro``, ``roa_rup`` -> ``rup``; without a standard code: ``simple`` ->
      ``en-x-simple``, ``gmq_bot`` -> ``gmq-x-bot``), so distinct languages stay distinct. Three-letter
      Wikipedia codes that clash with ISO 639-3 follow ISO: ``als`` is Tosk Albanian (Wikipedia's
      Alemannic is ``gsw``), ``nrm`` is Narom (Wikipedia's Norman is ``nrf``);
    - :data:`_KEEP`: codes CLDR merges into another language that ISO keeps apart (``tl`` Tagalog, not
      ``fil``; ``sh`` Serbo-Croatian, not ``sr-Latn``; ``cnr`` Montenegrin, not ``sr-ME``); and ``eml``
      (Emilian-Romagnol, retired from ISO 639-3 but used by Wikipedia);
    - :data:`_MACRO`: NLLB individual-language codes whose macrolanguage is the one people mean
      (``cmn`` -> ``zh``, ``pes`` -> ``fa``, ``arb`` -> ``ar``, ``zsm`` -> ``ms``, ...). CLDR's own list
      is not used: it would merge ``kmr`` into ``ku``, ``bho`` into ``bh`` and ``quz`` into ``qu``, which
      Babel-ImageNet and NLLB keep apart;
    - script names: Unicode script names (``Han`` for Hans/Hant, ``Japanese``, ``Hangul``, ``Bengali``,
      ``Oriya``, ``Canadian Aboriginal``), elsewhere CLDR's English script name (``Latin``, ``Cyrillic``,
      ``Devanagari``...); a language without CLDR script data is ``"Unknown"`` unless listed in
      :data:`_SCRIPT_FALLBACK`.

:data:`LANGUAGES` is a catalogue (not the set of accepted codes): every ISO 639-1 language, the
three-letter codes of multilingual datasets (NLLB, XM3600, mC4) and all Babel-ImageNet codes, canonical
code -> :class:`Language`. It gives :func:`langs_with_script` its list and the tiny LLMs their language
tokens; it is built on first use.

An unknown code raises :class:`UnknownLanguage` (a :class:`vlm.errors.UserError`) whose message says
what was given and suggests the nearest codes, or the code of a language *name* that was passed instead
of a code ("German" -> "use 'de'"). Names, garbage (``zz``, ``xx-yy-zz``) and the special codes ``und``,
``mul``, ``mis``, ``zxx`` and ``qaa``-``qtz`` (private use) are never accepted.
"""
from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Mapping
from typing import Iterator, NamedTuple

import langcodes
from langcodes.data_dicts import (DEFAULT_SCRIPTS, LANGUAGE_ALPHA3, LANGUAGE_REPLACEMENTS, LIKELY_SUBTAGS,
                                  MACROLANGUAGES)

from vlm.errors import UserError


class UnknownLanguage(UserError):
    """A language code :func:`normalize_lang` cannot map to a language."""


class Language(NamedTuple):
    code: str  # canonical (module docstring)
    iso639_3: str  # ISO 639-3 (or 639-2/5) code of the language subtag
    name: str  # English name
    script: str  # main script of text in this code, e.g. "Latin", "Han", "Japanese"


_WIKIMEDIA = {
    "zh-yue": "yue", "zh-min-nan": "nan", "zh-classical": "lzh", "be-x-old": "be-tarask", "nds-nl": "nds-NL",
    "bat-smg": "sgs", "fiu-vro": "vro", "roa-rup": "rup", "cbk-zam": "cbk", "map-bms": "jv-x-bms",
    "roa-tara": "nap-x-tara", "simple": "en-x-simple", "gmq-bot": "gmq-x-bot",
}
_KEEP = {"tl": "tl", "tgl": "tl", "sh": "sh", "hbs": "sh", "eml": "eml"}
_MACRO = {
    "arb": "ar", "azj": "az", "cmn": "zh", "ekk": "et", "gaz": "om", "khk": "mn", "lvs": "lv", "npi": "ne",
    "ory": "or", "pbt": "ps", "pes": "fa", "plt": "mg", "swh": "sw", "uzn": "uz", "ydd": "yi", "zsm": "ms",
}
_REGION_KEPT = {"nds-NL"}
_SPECIAL = {"und", "mul", "mis", "zxx"}
_POSIX_SCRIPTS = {"latin": "Latn", "roman": "Latn", "cyrillic": "Cyrl", "devanagari": "Deva", "arabic": "Arab",
                  "olchiki": "Olck", "meiteimayek": "Mtei", "bengali": "Beng", "hebrew": "Hebr"}
_POSIX_DROPPED = {"euro"}
# names and scripts CLDR lacks or words differently (ISO 15924 codes)
_NAMES = {"tl": "Tagalog", "sh": "Serbo-Croatian", "cnr": "Montenegrin", "eml": "Emilian-Romagnol",
          "be-tarask": "Belarusian (Taraskievica)", "nds-NL": "Dutch Low Saxon", "en-x-simple": "Simple English",
          "gmq-x-bot": "Westrobothnian", "jv-x-bms": "Banyumasan", "nap-x-tara": "Tarantino",
          "ca-valencia": "Valencian"}
_SCRIPT_FALLBACK = {
    "sh": "Latn", "cnr": "Latn", "eml": "Latn", "azb": "Arab", "ie": "Latn", "pi": "Deva", "oj": "Cans",
    "hmn": "Latn", "lus": "Latn", "dik": "Latn", "prs": "Arab", "swc": "Latn", "son": "Latn", "shs": "Latn",
    "rup": "Latn", "nrf": "Latn",
    "gmq": "Latn", "bh": "Deva", "nah": "Latn", "arc": "Syrc", "ang": "Latn", "enm": "Latn", "fro": "Latn",
    "non": "Runr", "orv": "Cyrl", "ota": "Arab", "dlm": "Latn", "ccc": "Latn", "mnc": "Mong", "mic": "Latn",
    "nci": "Latn", "lzz": "Latn", "syc": "Syrc", "khb": "Talu", "kxd": "Latn", "ovd": "Latn", "mel": "Latn",
    "sne": "Latn", "zdj": "Arab", "gmq-x-bot": "Latn", "pdt": "Latn", "dng": "Cyrl", "hrx": "Latn",
    "acw": "Arab", "afb": "Arab", "aii": "Syrc", "chy": "Latn", "frp": "Latn", "ltg": "Latn", "olo": "Latn",
    "bxr": "Cyrl", "srn": "Latn", "sva": "Geor", "sms": "Latn", "smj": "Latn", "uga": "Ugar", "rmy": "Latn",
    "mhr": "Cyrl", "kum": "Cyrl", "lbe": "Cyrl", "tcy": "Knda", "xal": "Cyrl", "yua": "Latn",
    "din": "Latn", "cbk": "Latn", "mwl": "Latn", "nog": "Cyrl", "nov": "Latn", "nrm": "Latn",
}
_SCRIPT_NAMES = {"Hans": "Han", "Hant": "Han", "Hani": "Han", "Jpan": "Japanese", "Kore": "Hangul",
                 "Beng": "Bengali", "Orya": "Oriya", "Cans": "Canadian Aboriginal", "Zyyy": "Common"}
_POSIX_RE = re.compile(r"^([^.@]+)(?:\.[^@]*)?(?:@(.+))?$")

# The 93 language codes of the bundled Babel-ImageNet file (upper-case there), lower-cased.
BABEL_IMAGENET_LANGS: tuple[str, ...] = (
    "af", "am", "ar", "as", "az", "be", "bg", "bn", "br", "bs", "ca", "cs", "cy", "da", "de", "el", "en",
    "eo", "es", "et", "eu", "fa", "fi", "fr", "fy", "ga", "gd", "gl", "gu", "ha", "he", "hi", "hr", "hu",
    "hy", "id", "is", "it", "ja", "jv", "ka", "kk", "km", "kn", "ko", "ku", "ky", "la", "lo", "lt", "lv",
    "mg", "mk", "ml", "mn", "mr", "ms", "my", "ne", "nl", "no", "om", "or", "pa", "pl", "ps", "pt", "ro",
    "ru", "sa", "sd", "si", "sk", "sl", "so", "sq", "sr", "su", "sv", "sw", "ta", "te", "th", "tl", "tr",
    "ug", "uk", "ur", "uz", "vi", "xh", "yi", "zh",
)
# The 298 codes of the full Babel-ImageNet file (babel_imagenet-298.json), as written there.
BABEL_IMAGENET_298: tuple[str, ...] = tuple("""
AB ACW ADY AF AFB AII AK ALS ALT AM AN ANG AR ARC ARY ARZ AS AST AV AY AZ AZB BA BAN BAR BAT_SMG BCL BE
BE_X_OLD BG BH BHO BJN BM BN BO BR BS BXR CA CCC CDO CE CEB CHR CHY CKB CO CR CRH CS CSB CU CV CY DA DE DIN
DIQ DLM DNG DSB DV DZ EE EL EML EN ENM EO ES ET EU EXT FA FI FIU_VRO FJ FO FR FRO FRP FRR FUR FY GA GAN GD GL
GMQ_BOT GN GOT GRC GU GV HA HAK HAW HE HI HR HRX HSB HT HU HY IA ID IG IK ILO INH IO IS IT IU JA JAM JBO JV
KA KAA KAB KBD KG KHB KI KK KL KM KMR KN KO KOI KRC KS KSH KU KUM KV KW KXD KY LA LAD LB LBE LEZ LG LI LIJ
LMO LN LO LT LTG LV LZZ MAI MDF MEL MG MHR MI MIC MIN MK ML MN MNC MNW MR MRJ MS MT MWL MY MYV MZN NAH NAP
NCI NDS NDS_NL NE NEW NL NN NO NOG NON NOV NRM NSO NV NY OC OJ OLO OM OR ORV OS OTA OVD PA PAM PAP PCD PDC
PDT PL PMS PNB PS PT QU RM RMY RO ROA_RUP RU RUE SA SAH SAT SC SCN SCO SD SE SH SHI SHN SI SIMPLE SK SL SM
SMJ SMN SMS SN SNE SO SQ SR SRN ST STQ SU SV SVA SW SYC SZL TA TCY TE TG TH TI TK TL TN TO TPI TR TT TYV
UDM UG UGA UK UR UZ VEC VEP VI VLS VO WA WAR WO WUU XAL XH XMF YI YO YUA ZA ZDJ ZH ZH_CLASSICAL ZH_MIN_NAN
ZH_YUE ZU""".split())
# Three-letter codes used by multilingual datasets (NLLB/FLORES-200, XM3600, mC4) for the catalogue.
_DATASET_CODES = """
ace acm aeb als apc ars ary arz ast awa azb ban bem bho bjn brx bug ceb ckb crh dik doi dsb dyu fil fon fur
gom hak haw hmn hne hsb ilo kab kac kam kbp kea kmb kmr knc kok lij lmo ltg lua luo lus mag mai min mni mos
nan nds nso nus pag pam pap prs quy quz sah sat scn shn szl taq tet tpi tum tzm udm umb vec war wuu yue zgh
""".split()


def _default_script(lang: str) -> str | None:
    """ISO 15924 code of the usual script of a bare language subtag: CLDR's likely subtags, ours
    (:data:`_SCRIPT_FALLBACK`), the registry's Suppress-Script, then the macrolanguage's; else None."""
    for source in (LIKELY_SUBTAGS.get(lang), _SCRIPT_FALLBACK.get(lang), DEFAULT_SCRIPTS.get(lang),
                   LIKELY_SUBTAGS.get(MACROLANGUAGES.get(lang, ""))):
        if source:
            return source.split("-")[1] if "-" in source else source
    return None


def _parse(code: str) -> langcodes.Language | None:
    """``code`` -> a BCP-47 tag with vlm's substitutions applied (before CLDR's), or None if unparsable."""
    m = _POSIX_RE.match(code.strip())
    if not m:
        return None
    base, modifier = m.group(1).replace("_", "-").lower(), (m.group(2) or "").lower()
    parts = base.split("-")
    for n in (3, 2, 1):  # Wikimedia codes, also with more subtags after them ("zh-yue-hk")
        if "-".join(parts[:n]) in _WIKIMEDIA:
            parts = _WIKIMEDIA["-".join(parts[:n])].lower().split("-") + parts[n:]
            break
    script = None
    if modifier in _POSIX_SCRIPTS:
        script = _POSIX_SCRIPTS[modifier]
    elif modifier and modifier not in _POSIX_DROPPED:
        parts.append(modifier)  # a variant (ca@valencia); the registry decides whether it exists
    keep = _KEEP.get(parts[0])
    if keep is None and "-" in LANGUAGE_REPLACEMENTS.get(parts[0], ""):
        keep = parts[0]  # CLDR would make it a region of another language (prs -> fa-AF, cnr -> sr-ME)
    try:
        if keep:
            raw = langcodes.Language.get("-".join(["und"] + parts[1:]), normalize=False)
            tag = langcodes.Language.make(language=keep, script=raw.script, territory=raw.territory,
                                          variants=raw.variants, private=raw.private)
        else:
            tag = langcodes.Language.get("-".join(parts), normalize=True)
    except (langcodes.LanguageTagError, ValueError):
        return None
    if script and not tag.script:
        tag = langcodes.Language.make(language=tag.language, script=script, territory=tag.territory,
                                      variants=tag.variants, private=tag.private)
    return tag


@functools.lru_cache(maxsize=8192)
def _canonical(code: str) -> str | None:
    tag = _parse(code)
    if tag is None or not tag.language or tag.extlangs:
        return None
    lang = _MACRO.get(tag.language, tag.language)
    if not re.fullmatch(r"[a-z]{2,3}", lang) or lang in _SPECIAL or re.fullmatch(r"q[a-t][a-z]", lang):
        return None  # "x-foo" parses as a language; und/mul/mis/zxx and qaa-qtz name no language
    if tag.script and re.fullmatch(r"Qa[a-b][a-x]", tag.script):
        return None  # private-use scripts
    if lang not in _KEEP.values():
        probe = langcodes.Language.make(language=lang, script=tag.script, territory=tag.territory,
                                        variants=tag.variants)
        if not probe.is_valid() or not langcodes.Language.make(language=lang).is_valid():
            return None
    default = _default_script(lang)
    script = tag.script
    if script is None and tag.territory and lang in LIKELY_SUBTAGS:
        script = langcodes.Language.make(language=lang, territory=tag.territory).maximize().script
    out = [lang]
    if script and script != default:
        out.append(script)
    if tag.territory and f"{lang}-{tag.territory}" in _REGION_KEPT:
        out.append(tag.territory)
    out += [v.lower() for v in tag.variants or ()]
    if tag.private:
        out.append(tag.private.lower())
    return "-".join(out)


def normalize_lang(code: str) -> str:
    """Canonical code of ``code`` ("DE", "de-DE", "de_DE.UTF-8", "deu_Latn", "ger" -> "de"; "zh_TW" ->
    "zh-Hant"; "zh_yue" -> "yue"). Raises :class:`UnknownLanguage` naming the code, with a hint."""
    if not isinstance(code, str):
        raise UnknownLanguage(f"language code must be a string, got {type(code).__name__} {code!r}")
    found = _canonical(code)
    if found is not None:
        return found
    raise UnknownLanguage(f"unknown language code {code!r}; {_hint(code)}")


def is_known(code: str) -> bool:
    """True if :func:`normalize_lang` accepts ``code``."""
    return isinstance(code, str) and _canonical(code) is not None


@functools.lru_cache(maxsize=4096)
def _info(canon: str) -> Language:
    tag = langcodes.Language.get(canon, normalize=False)
    lang = tag.language
    script = tag.script or _SCRIPT_FALLBACK.get(canon) or _default_script(lang)
    name = _NAMES.get(canon)
    if name is None and lang in _NAMES:
        name = _NAMES[lang] + (f" ({_script_name(tag.script)})" if tag.script else "")
    elif name is None:  # CLDR's: "Chinese (Traditional)", "Serbian (Latin)", "German (1901)"
        name = langcodes.Language.make(language=lang, script=tag.script, territory=tag.territory,
                                       variants=tag.variants).display_name()
    iso3 = {"sh": "hbs"}.get(lang) or LANGUAGE_ALPHA3.get(lang, lang)
    return Language(canon, iso3, name, _script_name(script) if script else "Unknown")


def _script_name(code: str) -> str:
    if code in _SCRIPT_NAMES:
        return _SCRIPT_NAMES[code]
    return langcodes.Language.make(script=code).script_name()


def lang_info(code: str) -> Language:
    """``Language(code, iso639_3, name, script)`` of ``code`` (normalised first)."""
    return _info(normalize_lang(code))


def script_of(code: str) -> str:
    """Main script of text in this code ("Latin", "Cyrillic", "Han", "Japanese", "Devanagari"...;
    "Unknown" where CLDR has no data for the language)."""
    return lang_info(code).script


def lang_name(code: str) -> str:
    """English name of the language ("de" -> "German", "zh-Hant" -> "Chinese (Traditional)")."""
    return lang_info(code).name


class _Catalogue(Mapping):
    """:data:`LANGUAGES`: canonical code -> :class:`Language`, built on first use (module docstring)."""

    def __init__(self):
        self._data: dict[str, Language] | None = None

    def _load(self) -> dict[str, Language]:
        if self._data is None:
            deprecated = {"in", "iw", "ji", "jw", "mo"}
            codes = [c for c in LANGUAGE_ALPHA3 if c not in deprecated] + _DATASET_CODES
            codes += [c.lower() for c in BABEL_IMAGENET_298] + list(_WIKIMEDIA.values())
            canon = sorted({normalize_lang(c) for c in codes})
            self._data = {c: _info(c) for c in canon}
        return self._data

    def __getitem__(self, code: str) -> Language:
        return self._load()[code]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


LANGUAGES: Mapping[str, Language] = _Catalogue()


def scripts() -> tuple[str, ...]:
    """The script names used by the catalogue, sorted."""
    return tuple(sorted({lang.script for lang in LANGUAGES.values()}))


def langs_with_script(script: str) -> list[str]:
    """Catalogue codes (:data:`LANGUAGES`) whose main script is ``script`` (case-insensitive), sorted."""
    want = script.strip().lower()
    out = sorted(c for c, lang in LANGUAGES.items() if lang.script.lower() == want)
    if not out:
        raise UnknownLanguage(f"unknown script {script!r}; known scripts: {', '.join(scripts())}")
    return out


def _hint(code: str) -> str:
    key = code.strip()
    base = ("use an ISO 639 code (e.g. 'de', 'deu', 'yue') or a BCP-47 tag (e.g. 'pt-BR', 'zh-Hant', "
            "'sr-Latn'); see vlm.data.langs")
    if len(key) > 3 and key.isalpha():
        try:
            found = normalize_lang(str(langcodes.find(key)))
            return f"{code!r} is a language name: use its code {found!r}"
        except (LookupError, UserError, langcodes.LanguageTagError):
            pass
    near = difflib.get_close_matches(key.lower().replace("_", "-"), list(LANGUAGES), n=3, cutoff=0.6)
    tips = [f"{c!r} ({LANGUAGES[c].name})" for c in near]
    return (f"did you mean {', '.join(tips)}? " if tips else "") + base
