"""Captioning and VQA metrics, per language, on given predictions.

Every text is Unicode-NFC normalised first (the same word typed with combining accents or precomposed
characters must match).

Captioning
* **BLEU** (BLEU-1..4, cumulative as in COCO, BLEU = BLEU-4) and **chrF** (chrF2, char order 6) through
  sacrebleu's corpus metrics, several references per prediction (a varying number is fine: missing ones
  are ``None``, which sacrebleu skips). BLEU's tokeniser per language (``bleu_tokenize``): ``zh`` ->
  sacrebleu's "zh" (Chinese characters split, the rest like 13a); ja, th, lo, km, my, bo (no spaces
  between words) -> "char" (sacrebleu's ja-mecab/ko-mecab need MeCab, and flores101/200 need a
  SentencePiece model download; neither is available offline); every other language -> "13a", the
  WMT standard. chrF works on characters and needs no tokeniser.
* **CIDEr-D** (Vedantam et al.; the ``ciderD`` scorer of coco-caption, implemented here because
  pycocoevalcap is not installed): n-grams n = 1..4; tf-idf vectors with document frequency counted over
  the *references* of the corpus (one document per prediction), idf = log(#documents) - log(max(1, df));
  cosine similarity per n with clipping of the prediction's tf-idf by the reference's
  (min(hyp, ref) * ref); gaussian length penalty exp(-delta^2 / (2 * 6^2)); mean over n, mean over the
  references, x10; corpus score = mean over predictions. As in the reference code, the "length" in delta
  is the number of *bigrams* (its ``if n == 1`` counts the second n-gram order), i.e. words - 1. Reported
  x100 like papers (a COCO CIDEr of 1.20 reads 120.0). Tokenisation (``caption_tokens``): NFC,
  lower-case, punctuation removed (coco's PTB tokenizer drops it), split on whitespace; for languages
  without spaces (``NO_SPACE_LANGS``: zh, ja, th, lo, km, my, bo) every remaining character is a token.

VQA
* **VQAv2 accuracy** as the official ``vqaEval.py``: answers normalised (``normalize_vqa_answer``:
  newlines/tabs to spaces, strip, ``processPunctuation`` then ``processDigitArticle``: number words to
  digits, articles a/an/the dropped, contractions restored); accuracy = mean over the 10 leave-one-out
  subsets of 9 annotator answers of min(1, #matches / 3). Two documented differences: (a) the official
  script normalises only when the annotators disagree, so a prediction "Yes" against ten "yes" scores 0
  there; we always normalise (as the EvalAI answer processor does for predictions); (b) with a single
  reference answer leave-one-out is undefined (the official formula would give 0): we score exact
  match. The official punctuation rules are kept, quirks included (the period regex's ``(?!<=\\d)`` and
  ``re.UNICODE`` passed as the count). English-specific steps (number words, articles, contractions)
  apply only to English (``lang`` "en" or unknown); other languages get NFC, lower-case and the
  punctuation rules.
* **exact match**: normalised prediction equals a normalised answer (max over answers).
* **relaxed match** (ChartQA "relaxed accuracy"): if both parse as numbers (``%`` = /100) and the target
  is non-zero, |pred - target| / |target| <= 5 %; otherwise normalised exact match.
"""
from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections import Counter, defaultdict

from vlm.errors import DataError

NO_SPACE_LANGS = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo"})


def nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def bleu_tokenize(lang: str | None) -> str:
    """sacrebleu tokeniser name for ``lang`` (see module docstring)."""
    lang = (lang or "").lower().split("-")[0].split("_")[0]
    if lang == "zh":
        return "zh"
    if lang in NO_SPACE_LANGS:
        return "char"
    return "13a"


def _ref_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Per-prediction reference lists -> sacrebleu's reference streams (padded with None)."""
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    R = max(len(r) for r in references)
    return [[nfc(refs[i]) if i < len(refs) else None for refs in references] for i in range(R)]


def bleu(predictions: list[str], references: list[list[str]], lang: str | None = None,
         tokenize: str | None = None) -> dict:
    """Corpus BLEU-1..4 (0-100) of ``predictions[i]`` against ``references[i]`` (one or more) with
    sacrebleu; returns {bleu, bleu1, bleu2, bleu3, bleu4, bleu_signature}."""
    from sacrebleu.metrics import BLEU

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    tok = tokenize or bleu_tokenize(lang)
    hyps, refs = [nfc(p) for p in predictions], _ref_streams(references)
    out = {}
    for n in (1, 2, 3, 4):
        m = BLEU(tokenize=tok, max_ngram_order=n)
        out[f"bleu{n}"] = m.corpus_score(hyps, refs).score
        if n == 4:
            out["bleu_signature"] = str(m.get_signature())
    out["bleu"] = out["bleu4"]
    return out


def chrf(predictions: list[str], references: list[list[str]]) -> dict:
    """Corpus chrF2 (0-100) with sacrebleu -> {chrf, chrf_signature}."""
    from sacrebleu.metrics import CHRF

    m = CHRF()
    s = m.corpus_score([nfc(p) for p in predictions], _ref_streams(references))
    return {"chrf": s.score, "chrf_signature": str(m.get_signature())}


_PUNCT_RE = re.compile(r"[\W_]+", re.UNICODE)


def caption_tokens(text: str, lang: str | None = None) -> list[str]:
    """CIDEr tokens: NFC, lower-case, punctuation/symbols removed; words, or characters for languages
    without spaces (``NO_SPACE_LANGS``)."""
    text = nfc(text).lower()
    # keep letters, marks (Thai/Devanagari vowel signs) and digits; everything else separates tokens
    cleaned = "".join(ch if (unicodedata.category(ch)[0] in "LMN") else " " for ch in text)
    if (lang or "").lower().split("-")[0] in NO_SPACE_LANGS:
        return [ch for ch in cleaned if not ch.isspace()]
    return cleaned.split()


def _ngrams(tokens: list[str], n: int = 4) -> Counter:
    c = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            c[tuple(tokens[i:i + k])] += 1
    return c


def cider_d(predictions: list[str], references: list[list[str]], lang: str | None = None,
            n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D (see module docstring) -> (corpus score x100, per-prediction scores x100)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("cider_d needs at least one prediction")
    hyp = [_ngrams(caption_tokens(p, lang), n) for p in predictions]
    refs = [[_ngrams(caption_tokens(r, lang), n) for r in rs] for rs in references]
    df = defaultdict(float)
    for rs in refs:
        for g in set(g for r in rs for g in r):
            df[g] += 1
    log_docs = math.log(float(len(refs)))

    def vec(counts):
        v = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = tf * (log_docs - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:  # the reference code's length: number of bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for h, rs in zip(hyp, refs):
        vh, nh, lh = vec(h)
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            delta = float(lh - lr)
            for k in range(n):
                val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-(delta ** 2) / (2 * sigma ** 2))
        scores.append(100.0 * 10.0 * (sum(total) / n) / len(rs))
    return sum(scores) / len(scores), scores


# ------------------------------------------------------------------------------------------------ VQA
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # count=re.UNICODE (32), as in the official code


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str, lang: str | None = "en") -> str:
    """The official VQAv2 answer normalisation (English); punctuation + lower-case for other languages."""
    a = nfc(answer).replace("\n", " ").replace("\t", " ").strip()
    a = _process_punctuation(a)
    if (lang or "en").lower().split("-")[0] == "en":
        return _process_digit_article(a)
    return " ".join(a.lower().split())


def vqa_accuracy(prediction: str, answers: list[str], lang: str | None = "en") -> float:
    """VQAv2 accuracy in [0, 1]: mean over leave-one-out annotator subsets of min(1, matches / 3)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    p = normalize_vqa_answer(prediction, lang)
    gts = [normalize_vqa_answer(a, lang) for a in answers]
    if len(gts) == 1:
        return float(p == gts[0])
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == p)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def exact_match(prediction: str, answers: list[str], lang: str | None = "en") -> float:
    p = normalize_vqa_answer(prediction, lang)
    return float(any(p == normalize_vqa_answer(a, lang) for a in answers))


def _to_float(text: str) -> float | None:
    """"12.5" -> 12.5, "40%" -> 0.4, "1,000" -> 1000.0; anything else (words, nan, inf) -> None."""
    t = text.strip()
    pct = t.endswith("%")
    if pct:
        t = t[:-1].strip()
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    try:
        v = float(t)
    except ValueError:
        return None
    if not math.isfinite(v):
        return None
    return v / 100.0 if pct else v


def relaxed_match(prediction: str, answers: list[str], lang: str | None = "en", tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: numbers within ``tolerance`` relative error, otherwise exact match."""
    for a in answers:
        pf, af = _to_float(nfc(prediction)), _to_float(nfc(a))
        if pf is not None and af:
            if abs(pf - af) / abs(af) <= tolerance:
                return 1.0
        elif normalize_vqa_answer(prediction, lang) == normalize_vqa_answer(a, lang):
            return 1.0
    return 0.0


# ------------------------------------------------------------------------------------------- files, per language
def read_jsonl(path: str, required: tuple[str, ...]) -> list[dict]:
    """Rows of a predictions file; every row must have ``required`` fields (DataError names the line)."""
    if not os.path.isfile(path):
        raise DataError(f"predictions file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
            miss = [k for k in required if k not in row]
            if miss:
                raise DataError(f"{path}:{i}: row lacks field(s) {', '.join(miss)}; rows need {', '.join(required)}")
            rows.append(row)
    if not rows:
        raise DataError(f"predictions file {path} has no rows")
    return rows


def _by_lang(rows: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[str(r.get("lang") or "en").lower()].append(r)
    return dict(sorted(out.items()))


def _summarise(task: str, primary: str, metrics: list[str], per_lang: dict) -> dict:
    summary = {"n_languages": len(per_lang), "n_total": sum(r["n"] for r in per_lang.values())}
    for m in metrics:
        summary[f"mean_{m}"] = sum(r[m] for r in per_lang.values()) / max(len(per_lang), 1)
    return {"task": task, "primary_metric": primary, "metrics": metrics, "per_language": per_lang,
            "summary": summary, "warnings": []}


def caption_metrics(rows: list[dict]) -> dict:
    """Rows {id, lang, prediction, references: [...]} -> results dict (per language BLEU-1..4, chrF, CIDEr-D)."""
    per_lang = {}
    for lang, rs in _by_lang(rows).items():
        preds = [str(r["prediction"]) for r in rs]
        refs = [[r["references"]] if isinstance(r["references"], str) else list(r["references"]) for r in rs]
        res = {"n": len(rs), "bleu_tokenize": bleu_tokenize(lang)}
        res.update(bleu(preds, refs, lang))
        res.update(chrf(preds, refs))
        res["cider"] = cider_d(preds, refs, lang)[0]
        per_lang[lang] = res
    return _summarise("caption", "cider", ["bleu", "bleu1", "bleu2", "bleu3", "bleu4", "chrf", "cider"], per_lang)


def vqa_metrics(rows: list[dict]) -> dict:
    """Rows {id, lang, prediction, answers: [...]} -> results dict (per language VQA accuracy, exact, relaxed;
    percentages)."""
    per_lang = {}
    for lang, rs in _by_lang(rows).items():
        acc = ex = rel = 0.0
        for r in rs:
            ans = [r["answers"]] if isinstance(r["answers"], str) else [str(a) for a in r["answers"]]
            p = str(r["prediction"])
            acc += vqa_accuracy(p, ans, lang)
            ex += exact_match(p, ans, lang)
            rel += relaxed_match(p, ans, lang)
        n = len(rs)
        per_lang[lang] = {"n": n, "vqa_accuracy": 100 * acc / n, "exact_match": 100 * ex / n,
                          "relaxed_match": 100 * rel / n}
    return _summarise("vqa", "vqa_accuracy", ["vqa_accuracy", "exact_match", "relaxed_match"], per_lang)
