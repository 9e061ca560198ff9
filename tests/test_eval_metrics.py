"""Caption metrics (BLEU/chrF against sacrebleu's own CLI, CIDEr-D by hand) and VQA metrics."""
import json
import math
import shutil
import subprocess
import sys
import unicodedata

import pytest

from vlm.eval.metrics import (bleu, bleu_tokenize, caption_metrics, caption_tokens, chrf, cider_d, exact_match,
                          normalize_vqa_answer, read_jsonl, relaxed_match, vqa_accuracy, vqa_metrics)
from vlm.errors import DataError

CASES = {
    "en": (["the cat sat on the mat", "a man rides a red bike", "two dogs play"],
           [["the cat is on the mat", "a cat sat on the mat"], ["a man riding a red bicycle", "man on a bike",
                                                                "a person rides a bike"], ["two dogs playing"]]),
    "zh": (["一只猫坐在垫子上", "一个男人骑着红色自行车"],
           [["一只猫在垫子上", "猫坐在垫子上"], ["一个男人骑红色的自行车"]]),
    "ja": (["猫がマットの上に座っている", "赤い自転車に乗る男"],
           [["猫がマットに座っている"], ["赤い自転車に乗っている男性", "男が自転車に乗る"]]),
}


def _sacrebleu_cli():
    exe = shutil.which("sacrebleu")
    return [exe] if exe else [sys.executable, "-m", "sacrebleu"]


@pytest.mark.parametrize("lang", list(CASES))
def test_bleu_chrf_agree_with_sacrebleu_cli(tmp_path, lang):
    hyps, refs = CASES[lang]
    R = max(len(r) for r in refs)
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    ref_files = []
    for i in range(R):  # a missing reference is an empty line, which sacrebleu skips
        p = tmp_path / f"ref{i}.txt"
        p.write_text("\n".join(r[i] if i < len(r) else "" for r in refs) + "\n", encoding="utf-8")
        ref_files.append(str(p))
    tok = bleu_tokenize(lang)
    assert tok == {"en": "13a", "zh": "zh", "ja": "char"}[lang]
    out = subprocess.run(_sacrebleu_cli() + ref_files + ["-i", str(tmp_path / "hyp.txt"), "-m", "bleu", "chrf",
                                                        "-tok", tok, "--format", "json", "-w", "4"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    cli = json.loads(out)
    ours = bleu(hyps, refs, lang)
    ours.update(chrf(hyps, refs))
    assert ours["bleu"] == pytest.approx(cli[0]["score"], abs=1e-3)
    assert ours["chrf"] == pytest.approx(cli[1]["score"], abs=1e-3)
    # BLEU-2 = BP * geometric mean of p1, p2 (CLI's verbose precisions are rounded to 0.1)
    p = [float(x) for x in cli[0]["verbose_score"].split(" ")[0].split("/")]
    bp = float(cli[0]["verbose_score"].split("BP = ")[1].split(" ")[0])
    assert ours["bleu2"] == pytest.approx(bp * math.sqrt(p[0] * p[1]), abs=0.2)
    assert ours["bleu1"] == pytest.approx(bp * p[0], abs=0.1)


def test_nfc_normalisation():
    composed = "le café crème était très bon ce matin à côté"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert bleu([decomposed], [[composed]], "fr")["bleu"] == pytest.approx(100.0)
    assert chrf([decomposed], [[composed]])["chrf"] == pytest.approx(100.0)
    assert caption_tokens(decomposed, "fr")[1:3] == ["café", "crème"]


def test_tokens_for_languages_without_spaces():
    assert caption_tokens("一只猫，在垫子上。", "zh") == list("一只猫在垫子上")
    assert caption_tokens("แมวนอน", "th") == list("แมวนอน")
    assert caption_tokens("Eine KATZE, die schläft!", "de") == ["eine", "katze", "die", "schläft"]


def test_cider_d_hand_checked():
    # 2 documents -> idf of every reference n-gram = ln 2 - ln 1 (each n-gram in one document)
    score, per = cider_d(["a b", "c"], [["a b"], ["c d"]])
    # doc 1: identical -> cos 1 for n=1,2, 0 for n=3,4 (no n-grams) -> 10 * (2/4) = 5
    # doc 2: n=1 cos = 1/sqrt(2), bigram lengths 0 vs 1 -> penalty exp(-1/72)
    assert per[0] == pytest.approx(500.0)
    assert per[1] == pytest.approx(100 * 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4)
    assert score == pytest.approx((per[0] + per[1]) / 2)
    # clipping: hyp "a a" vs ref "a b": tf-idf of "a" clipped from 2L to L -> cos_1 = L^2 / (2L * sqrt(2) L)
    _, per2 = cider_d(["a a", "c"], [["a b"], ["c"]])
    assert per2[0] == pytest.approx(100 * 10 * (1 / (2 * math.sqrt(2))) / 4)
    assert per2[1] == pytest.approx(250.0)
    # a single document has idf 0 everywhere: the score is 0 by construction
    assert cider_d(["x y"], [["x y"]])[0] == 0.0
    # character tokens for zh: "猫坐" vs refs differing in one character
    s_zh, _ = cider_d(["猫坐", "狗跑"], [["猫坐"], ["狗走"]], lang="zh")
    assert s_zh == pytest.approx((500.0 + 100 * 10 * 0.5 / 4) / 2)


@pytest.mark.parametrize("raw,norm", [
    ("Yes", "yes"), ("yes.", "yes"), ("Two", "2"), ("the dog", "dog"), ("a  red ball ", "red ball"),
    ("dont", "don't"), ("isnt it", "isn't it"), ("1,000", "1000"), ("3.5", "3.5"), ("hello-world", "hello world"),
    ("x - y", "x y"), ("what?", "what"), ("ten", "10"), ("none", "0"), ("\tleft\n", "left"),
])
def test_vqa_normalisation(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_leave_one_out():
    base = ["no"] * 10
    for k, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["two"] * k + base[k:]
        assert vqa_accuracy("2", answers) == pytest.approx(want), k
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0  # always normalised (see module docstring)
    assert vqa_accuracy("Hund", ["hund"], lang="de") == 1.0  # single answer: exact match
    assert normalize_vqa_answer("Der Hund!", lang="de") == "der hund"  # no English article rules


def test_exact_and_relaxed_match():
    assert exact_match("The Cat", ["cat", "kitten"]) == 1.0 and exact_match("dog", ["cat"]) == 0.0
    assert relaxed_match("10.4", ["10"]) == 1.0 and relaxed_match("10.6", ["10"]) == 0.0
    assert relaxed_match("40%", ["0.41"]) == 1.0 and relaxed_match("1,040", ["1000"]) == 1.0
    assert relaxed_match("0", ["0"]) == 1.0 and relaxed_match("0.01", ["0"]) == 0.0
    assert relaxed_match("Blue", ["blue"]) == 1.0 and relaxed_match("nan", ["nan"]) == 1.0


def test_per_language_from_jsonl(tmp_path):
    rows = [{"id": 1, "lang": "en", "prediction": "two", "answers": ["2"] * 10},
            {"id": 2, "lang": "en", "prediction": "red", "answers": ["blue"] * 9 + ["red"]},
            {"id": 3, "lang": "DE", "prediction": "rot", "answers": ["rot"]}]
    p = tmp_path / "vqa.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    res = vqa_metrics(read_jsonl(str(p), ("id", "prediction", "answers")))
    assert res["per_language"]["en"]["vqa_accuracy"] == pytest.approx(100 * (1 + 0.3) / 2)
    assert res["per_language"]["de"]["exact_match"] == 100.0 and res["primary_metric"] == "vqa_accuracy"
    crow = [{"id": 1, "lang": "en", "prediction": h, "references": r} for h, r in zip(*CASES["en"])]
    crow += [{"id": 9, "lang": "zh", "prediction": h, "references": r} for h, r in zip(*CASES["zh"])]
    cres = caption_metrics(crow)
    assert set(cres["per_language"]) == {"en", "zh"} and cres["per_language"]["zh"]["bleu_tokenize"] == "zh"
    assert cres["per_language"]["en"]["bleu"] == pytest.approx(bleu(*CASES["en"], "en")["bleu"])
    assert cres["per_language"]["en"]["cider"] == pytest.approx(cider_d(*CASES["en"], "en")[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prediction": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1: row lacks field\(s\) answers"):
        read_jsonl(str(bad), ("id", "prediction", "answers"))


@pytest.mark.slow
def test_cli_caption_generated_by_saved_vision_llm(tmp_path):
    """`vlm eval caption --model DIR --shards ...`: a saved tiny vision-LLM generates, then the metrics score."""
    import vlm.vision_llm as vllm
    import vlm.data_recipes.demo as demo_mod
    from vlm.cli import main

    vllm.VisionLLM(vllm.VisionLLMConfig()).save_pretrained(tmp_path / "vllm")
    demo = demo_mod.build_demo(tmp_path / "demo", train=2, val=4, size=32, train_shards=1, val_shards=1,
                               langs=["en", "zh"])
    assert main(["eval", "caption", "--model", str(tmp_path / "vllm"), "--shards", str(demo.val[0]), "--out",
                 str(tmp_path / "out"), "--limit", "2", "--max-new-tokens", "4", "--no-progress"]) == 0
    rep = json.loads((tmp_path / "out" / "caption.json").read_text(encoding="utf-8"))
    assert set(rep["per_language"]) == {"en", "zh"} and rep["per_language"]["zh"]["n"] == 2
    assert rep["per_language"]["zh"]["bleu_tokenize"] == "zh" and rep["metadata"]["model"] == str(tmp_path / "vllm")
