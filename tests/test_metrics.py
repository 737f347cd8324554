"""E2E-style generation metrics: BLEU and NIST against reference implementations (sacrebleu, NLTK) and hand
computation on multi-reference examples, CIDEr-D by hand (and against pycocoevalcap when installed), the
PTB-like tokenisation, and generation_metrics as `lora eval --generate` reports it."""

import math

import pytest

from lora_cli.metrics import (
    coco_tokenize, corpus_bleu, corpus_cider_d, corpus_nist, generation_metrics, meteor_unavailable,
    nist_brevity_penalty, tokenize_13a,
)

# A hand-made E2E-like corpus: three meaning representations with 2, 3 and 1 references (the test set has ~7.5).
HYPS = [
    "The Vaults is a pub near Café Adriatic with a 5 star rating. Prices start at £30.",
    "Blue Spice is a coffee shop in the city centre.",
    "zizzi is a family-friendly Italian restaurant.",
]
REFS = [
    ["The Vaults pub near Café Adriatic has a 5 star rating. Prices start at £30.",
     "Near Café Adriatic is The Vaults, a 5 star pub with prices over £30."],
    ["In the city centre there is a coffee shop called Blue Spice.",
     "Blue Spice coffee shop is located in the centre of the city.",
     "Blue Spice is a coffee shop in the city centre near the river."],
    ["Zizzi is a family-friendly restaurant serving Italian food."],
]


def tokens(lowercase=False):
    return ([tokenize_13a(h, lowercase) for h in HYPS],
            [[tokenize_13a(r, lowercase) for r in rs] for rs in REFS])


@pytest.mark.parametrize("lowercase", [False, True])
def test_bleu_equals_sacrebleu_and_nltk_with_several_references(lowercase):
    from nltk.translate.bleu_score import corpus_bleu as nltk_bleu
    from sacrebleu import corpus_bleu as sacre_bleu

    score, signature = corpus_bleu(HYPS, REFS, lowercase)
    # sacrebleu's own entry point, the reference streams padded with None by hand
    streams = [[rs[k] if k < len(rs) else None for rs in REFS] for k in range(3)]
    assert score == pytest.approx(sacre_bleu(HYPS, streams, lowercase=lowercase).score, abs=1e-9)
    # an independent implementation on the same 13a tokens: NLTK clips by the max count over references and
    # takes the closest reference length (the shorter on a tie), as sacrebleu and mteval-v13a do
    hyp_tokens, ref_tokens = tokens(lowercase)
    assert score == pytest.approx(100 * nltk_bleu(ref_tokens, hyp_tokens), abs=1e-9)
    assert ("case:lc" in signature) == lowercase and "tok:13a" in signature
    assert 40 < score < 90


def test_lowercase_changes_bleu_and_nist_only_through_case():
    cased = generation_metrics(HYPS, REFS)
    lower = generation_metrics(HYPS, REFS, lowercase=True)
    # "zizzi" vs "Zizzi": case-insensitive matching gains that unigram and its n-grams
    assert lower["bleu"] > cased["bleu"] and lower["nist"] > cased["nist"]
    assert lower["rouge_l"] == cased["rouge_l"] and lower["cider"] == cased["cider"]  # lowercased anyway
    assert (cased["lowercase"], lower["lowercase"]) == (False, True)


@pytest.mark.parametrize("lowercase", [False, True])
def test_nist_equals_nltk_with_one_reference_each(lowercase):
    from nltk.translate.nist_score import corpus_nist as nltk_nist

    hyp_tokens, ref_tokens = tokens(lowercase)
    for pick in (0, -1):  # the first, then the last reference of each prompt
        single = [[rs[pick]] for rs in ref_tokens]
        ours = corpus_nist(hyp_tokens, single)
        assert ours == pytest.approx(nltk_nist(single, hyp_tokens, n=5), abs=1e-6)
        assert ours > 1.0
    # a hypothesis shorter than the references: the brevity penalty is used, and still agrees
    short = [h[:6] for h in hyp_tokens]
    single = [[rs[0]] for rs in ref_tokens]
    assert nist_brevity_penalty(sum(map(len, short)), sum(len(r[0]) for r in single)) < 0.5
    assert corpus_nist(short, single) == pytest.approx(nltk_nist(single, short, n=5), abs=1e-6)


def test_nist_several_references_hand_computed():
    """hyp "a b c", references "a b" and "b c" (the whole corpus).
    Counts over the references: a 1, b 2, c 1 (4 words); "a b" 1, "b c" 1.
    Info: a = log2(4/1) = 2, b = log2(4/2) = 1, c = 2; "a b" = log2(1/1) = 0, "b c" = log2(2/1) = 1.
    mteval merges the references: unigrams a, b, c all match (5 bits / 3), bigrams "a b", "b c" (1 bit / 2),
    the trigram does not (0 / 1). Output 3 words, mean reference 2: no penalty. NIST = 5/3 + 1/2 = 13/6.
    NLTK scores each order against the single best reference: 3/3 + 1/2 + 0 = 1.5 (n=3: it divides by zero
    for orders longer than every hypothesis)."""
    from nltk.translate.nist_score import corpus_nist as nltk_nist

    hyp, refs = ["a", "b", "c"], [["a", "b"], ["b", "c"]]
    assert corpus_nist([hyp], [refs]) == pytest.approx(13 / 6, abs=1e-12)
    assert nltk_nist([refs], [hyp], n=3) == pytest.approx(1.5, abs=1e-12)  # the difference, documented
    # the brevity penalty is 1/2 at 2/3 of the mean reference length (mteval's beta)
    assert nist_brevity_penalty(2, 3) == pytest.approx(0.5, abs=1e-12)
    assert nist_brevity_penalty(3, 3) == 1.0 and nist_brevity_penalty(0, 3) == 0.0


def test_cider_d_hand_computed():
    """Every n-gram occurs in the references of one segment only, so every idf is log(3) and cancels in the
    cosines. Segment 1: "a b" vs "a b" (1 for n=1 and 2) and "a c" (n=1: 1/2, n=2: 0), same lengths:
    10 * mean_n(sum over refs) / 2 refs = 10 * ((1.5 + 1 + 0 + 0) / 4) / 2 = 3.125. Segment 2: "d" vs "d e":
    n=1 cosine 1/sqrt(2), no bigram in "d", length 0 vs 1 bigram: penalty exp(-1/72); 10 * (1/sqrt 2) e^(-1/72)
    / 4. Segment 3: "f f g" vs "f g": n=1 clipped min(2,1)*1 + 1*1 = 2 over sqrt(5) sqrt(2); n=2 1 / sqrt(2);
    lengths 2 vs 1 bigrams: exp(-1/72); 10 * (2/sqrt 10 + 1/sqrt 2) e^(-1/72) / 4."""
    hyps = [["a", "b"], ["d"], ["f", "f", "g"]]
    refs = [[["a", "b"], ["a", "c"]], [["d", "e"]], [["f", "g"]]]
    pen = math.exp(-1 / 72)
    seg = [3.125, 10 * (1 / math.sqrt(2)) * pen / 4, 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) * pen / 4]
    assert corpus_cider_d(hyps, refs) == pytest.approx(sum(seg) / 3, abs=1e-12)
    assert corpus_cider_d([["a", "b"]], [[["a", "b"]]]) == 0.0  # one segment: log(1) idf, as coco-caption


def test_cider_d_equals_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider  # the scorer is pure Python (only its tokenizer needs Java)

    hyps = [coco_tokenize(h) for h in HYPS]
    refs = [[coco_tokenize(r) for r in rs] for rs in REFS]
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    assert corpus_cider_d(hyps, refs) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)


def test_coco_tokenize():
    assert coco_tokenize('The pub\'s name isn\'t "Vaults" (near Café Adriatic), £30.') == [
        "the", "pub", "'s", "name", "is", "n't", "vaults", "near", "café", "adriatic", "£30"]
    assert coco_tokenize("family-friendly; 5 out of 5!") == ["family-friendly", "5", "out", "of", "5"]


def test_generation_metrics_fields_and_parts():
    m = generation_metrics(HYPS, REFS, lowercase=True)
    hyp_tokens, ref_tokens = tokens(lowercase=True)
    assert m["bleu"] == corpus_bleu(HYPS, REFS, lowercase=True)[0]
    assert m["nist"] == corpus_nist(hyp_tokens, ref_tokens)
    assert m["cider"] == corpus_cider_d([coco_tokenize(h) for h in HYPS],
                                        [[coco_tokenize(r) for r in rs] for rs in REFS])
    assert "meteor" not in m  # only when asked
    assert (m["prompts"], m["references"], m["exact_match"]) == (3, 6, 0.0)
    with pytest.raises(ValueError):
        generation_metrics(HYPS, REFS[:2])


def test_meteor_is_offline_with_pycocoevalcap_and_java():
    why = meteor_unavailable()
    if why:
        assert "pycocoevalcap" in why or "Java" in why
        pytest.skip(why)
    from pycocoevalcap.meteor.meteor import Meteor

    hyps = [coco_tokenize(h) for h in HYPS]
    refs = [[coco_tokenize(r) for r in rs] for rs in REFS]
    m = generation_metrics(HYPS, REFS, meteor=True)
    scorer = Meteor()
    direct, _ = scorer.compute_score({i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)},
                                     {i: [" ".join(h)] for i, h in enumerate(hyps)})
    del scorer
    assert m["meteor"] == pytest.approx(100 * direct, abs=1e-9)
    assert 30 < m["meteor"] < 90
