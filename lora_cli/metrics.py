"""Generation metrics with several references per prompt, as the E2E NLG Challenge scores them.

E2E (Novikova et al. 2017, arXiv:1706.09254) has ~8 human references per meaning representation, and every
metric here uses all references of a prompt at once. The challenge's official script (tuetschek/e2e-metrics,
`measure_scores.py`, the one the LoRA paper's Table 3 was computed with) reports:

- BLEU (Papineni et al. 2002) and NIST (Doddington 2002) as mteval-v13a computes them: 13a tokenisation,
  case-insensitive. Here BLEU is sacrebleu's corpus BLEU and NIST is `corpus_nist`, both on sacrebleu's 13a
  tokens; `lowercase=True` makes both case-insensitive as in the challenge (the default is case-sensitive, the
  usual sacrebleu setting).
- METEOR 1.5, ROUGE-L and CIDEr through the MS-COCO caption evaluation code (pycocoevalcap) on text that
  Stanford's PTB tokenizer (Java) lowercased and stripped of punctuation. Here: CIDEr-D is `corpus_cider_d`
  (pure Python, on `coco_tokenize`, a Python approximation of that tokenizer); METEOR runs pycocoevalcap's
  METEOR 1.5 jar (it ships the jar and its paraphrase tables, so it works offline) only when asked and when
  pycocoevalcap and a Java runtime are installed; ROUGE-L stays the rouge-score F-measure of the best reference
  (the COCO variant combines the best precision and the best recall with beta 1.2, so it differs slightly).
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from typing import Sequence

# ------------------------------------------------------------------------------------------- tokenisation


def tokenize_13a(text: str, lowercase: bool = False) -> list[str]:
    """mteval-v13a tokens (sacrebleu's Tokenizer13a, the tokenisation BLEU uses here), optionally lowercased
    first, as sacrebleu's BLEU(lowercase=True) does."""
    return _tokenizer_13a()(text.lower() if lowercase else text).split()


_TOKENIZER_13A = None


def _tokenizer_13a():
    global _TOKENIZER_13A
    if _TOKENIZER_13A is None:
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # here: only --generate pays for sacrebleu

        _TOKENIZER_13A = Tokenizer13a()
    return _TOKENIZER_13A


# The tokens coco-caption's PTBTokenizer wrapper removes after tokenising (-LRB- etc. are brackets there).
COCO_PUNCTUATION = frozenset(["''", "'", "``", "`", '"', "(", ")", "[", "]", "{", "}", ".", "?", "!", ",", ":",
                              "-", "--", "...", ";"])
_CLITIC = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")


def coco_tokenize(text: str) -> list[str]:
    """Lowercased words without punctuation, as coco-caption feeds METEOR, ROUGE-L and CIDEr: a Python stand-in
    for Stanford's PTBTokenizer (-lowerCase, then its punctuation tokens removed), which needs Java. 13a tokens,
    English clitics split off as PTB does ("don't" -> "do n't", "pub's" -> "pub 's"), punctuation dropped."""
    text = _CLITIC.sub(r"\1 \2", text.lower())
    return [t for t in tokenize_13a(text) if t not in COCO_PUNCTUATION]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------------------------------------------- BLEU


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], lowercase: bool = False):
    """sacrebleu corpus BLEU (13a tokens, 4-grams, clipped by the largest count in any one reference, brevity
    penalty against the closest reference length, the shorter on a tie): (score 0-100, signature)."""
    from sacrebleu.metrics import BLEU  # here: only --generate pays for sacrebleu

    width = max(len(rs) for rs in references)
    # sacrebleu takes reference streams; a prompt with fewer references pads its streams with None.
    streams = [[rs[k] if k < len(rs) else None for rs in references] for k in range(width)]
    bleu = BLEU(lowercase=lowercase)
    return bleu.corpus_score(list(hypotheses), streams).score, str(bleu.get_signature())


# ---------------------------------------------------------------------------------------------------- NIST

# beta of the NIST brevity penalty: 0.5 when the output is 2/3 of the reference length (mteval-v13a).
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def corpus_nist(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
                max_n: int = 5) -> float:
    """NIST (Doddington 2002) of tokenised hypotheses, each with its tokenised references, as mteval-v13a and the
    E2E challenge's Python port of it (pymteval) compute it:

        NIST = sum_n [ sum of Info(g) over matched n-grams g / number of hypothesis n-grams ] * BP
        Info(w1..wn) = log2( count(w1..wn-1) / count(w1..wn) ), counts over every reference of the corpus
                       (count of the empty prefix = the number of reference words)
        BP = exp(-beta * log(min(1, L_sys / L_ref))^2), L_ref = sum over segments of the mean reference length

    A hypothesis n-gram matches at most as often as it occurs in the reference that has it most often (the
    references of a segment are merged as in BLEU). NLTK's corpus_nist gives the same with one reference per
    segment; with several it scores against the single best reference instead, unlike mteval."""
    if len(hypotheses) != len(references):
        raise ValueError("need one list of references per hypothesis")
    counts: Counter = Counter()
    for refs in references:
        for ref in refs:
            counts[()] += len(ref)
            for n in range(1, max_n + 1):
                counts.update(_ngrams(ref, n))
    gain = [0.0] * max_n  # information of the matched n-grams, per order
    total = [0] * max_n  # hypothesis n-grams, per order
    sys_words, ref_words = 0, 0.0
    for hyp, refs in zip(hypotheses, references):
        sys_words += len(hyp)
        ref_words += sum(len(r) for r in refs) / len(refs) if refs else 0.0
        for n in range(1, max_n + 1):
            hyp_counts = _ngrams(hyp, n)
            most: dict = {}
            for ref in refs:
                for gram, c in _ngrams(ref, n).items():
                    most[gram] = max(most.get(gram, 0), c)
            for gram, c in hyp_counts.items():
                hits = min(c, most.get(gram, 0))
                if hits:
                    gain[n - 1] += hits * math.log2(counts[gram[:-1]] / counts[gram])
            total[n - 1] += sum(hyp_counts.values())
    score = sum(g / t for g, t in zip(gain, total) if t)
    return score * nist_brevity_penalty(sys_words, ref_words)


def nist_brevity_penalty(sys_words: float, ref_words: float) -> float:
    if ref_words <= 0:
        return 1.0
    ratio = sys_words / ref_words
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


# -------------------------------------------------------------------------------------------------- CIDEr-D


def corpus_cider_d(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
                   max_n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam, Zitnick, Parikh 2015, arXiv:1411.5726, sec. 5) as coco-caption's CiderScorer computes
    it, the "CIDEr" the E2E challenge reports (on the ~0-10 scale: x10). For each segment and n = 1..4:

        g(s)[w] = count of n-gram w in s * (log N - log max(1, df(w)))   N segments, df(w): segments whose
                                                                         references contain w
        CIDEr-D_n = 1/m sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2)) * <min(g(c), g(s_j)), g(s_j)> / (|g(c)| |g(s_j)|)

    over the m references s_j of candidate c; the segment score is 10 x the mean over n, the corpus score the
    mean over segments. As in coco-caption, term frequencies are raw counts (the paper normalises them; the
    cosine is the same, the clipping min() is not) and the length l is the number of bigrams, i.e. words - 1
    (so length differences are those of word counts for non-empty texts). df comes from the scored corpus
    itself, so the score of a segment depends on the others (one segment alone scores 0)."""
    if len(hypotheses) != len(references):
        raise ValueError("need one list of references per hypothesis")
    if not hypotheses:
        return float("nan")

    def grams(tokens):
        out = Counter()
        for n in range(1, max_n + 1):
            out.update(_ngrams(tokens, n))
        return out

    cands = [grams(h) for h in hypotheses]
    refs = [[grams(r) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update(set().union(*[r.keys() for r in rs]) if rs else set())
    log_n = math.log(float(len(refs)))

    def vector(counts):
        vec = [dict() for _ in range(max_n)]
        norm = [0.0] * max_n
        for gram, tf in counts.items():
            value = tf * (log_n - math.log(max(1.0, df[gram])))
            vec[len(gram) - 1][gram] = value
            norm[len(gram) - 1] += value * value
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for cand, rs in zip(cands, refs):
        vec, norm, length = vector(cand)
        per_n = [0.0] * max_n
        for r in rs:
            vec_r, norm_r, length_r = vector(r)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                dot = sum(min(v, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, v in vec[n].items())
                if norm[n] != 0 and norm_r[n] != 0:
                    dot /= norm[n] * norm_r[n]
                per_n[n] += dot * penalty
        scores.append(10.0 * (sum(per_n) / max_n) / len(rs) if rs else 0.0)
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------------------------------- METEOR


def meteor_unavailable() -> str | None:
    """Why METEOR cannot run here (None if it can): it needs pycocoevalcap (which ships METEOR 1.5 and its
    English paraphrase tables, so nothing is downloaded) and a Java runtime. NLTK's METEOR is not used: it
    needs the WordNet corpus, a separate download."""
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return "METEOR needs the pycocoevalcap package (pip install pycocoevalcap) and a Java runtime"
    if shutil.which("java") is None:
        return "METEOR needs a Java runtime (the `java` command) for pycocoevalcap's METEOR 1.5"
    return None


def corpus_meteor(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> float:
    """METEOR 1.5 (Denkowski & Lavie 2014; `-l en -norm`, all references of a segment) through pycocoevalcap,
    on coco_tokenize'd text as coco-caption feeds it, 0-1. Starts a Java process (2 GB heap)."""
    from pycocoevalcap.meteor.meteor import Meteor  # optional dependency (the e2e extra)

    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(references)}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        del scorer  # its __del__ ends the Java process
    return float(score)


# ------------------------------------------------------------------------------------------------ all at once


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ROUGE-L (rouge-score F-measure, the best over a prompt's references, averaged over prompts), 0-100."""
    from rouge_score import rouge_scorer  # here: only --generate pays for rouge-score (and its nltk)

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [max(scorer.score(r, h)["rougeL"].fmeasure for r in rs) for h, rs in zip(hypotheses, references)]
    return 100.0 * sum(scores) / len(scores)


def generation_metrics(hypotheses: list[str], references: list[list[str]], lowercase: bool = False,
                       meteor: bool = False) -> dict:
    """Corpus BLEU (sacrebleu, 13a tokens, every reference of a prompt used at once) and NIST (`corpus_nist`,
    5-grams, same tokens), case-insensitive with `lowercase` as the E2E challenge scores them; CIDEr-D
    (`corpus_cider_d` on `coco_tokenize`); ROUGE-L (rouge-score F-measure, the best over a prompt's references,
    averaged over prompts); with `meteor`, METEOR 1.5 (pycocoevalcap + Java, see meteor_unavailable); and exact
    match (the fraction of prompts whose output equals one of its references, whitespace-stripped). BLEU,
    ROUGE-L and METEOR are 0-100; NIST and CIDEr on their own scales (E2E: NIST ~8-9, CIDEr ~2.5)."""
    if len(hypotheses) != len(references) or not hypotheses or any(not rs for rs in references):
        raise ValueError("need one non-empty list of references per hypothesis")
    hyps = [h.strip() for h in hypotheses]
    refs = [[r.strip() for r in rs] for rs in references]
    bleu, signature = corpus_bleu(hyps, refs, lowercase)
    nist = corpus_nist([tokenize_13a(h, lowercase) for h in hyps],
                       [[tokenize_13a(r, lowercase) for r in rs] for rs in refs])
    coco_hyps = [coco_tokenize(h) for h in hyps]
    coco_refs = [[coco_tokenize(r) for r in rs] for rs in refs]
    out = {
        "bleu": bleu,
        "nist": nist,
        "rouge_l": rouge_l(hyps, refs),
        "cider": corpus_cider_d(coco_hyps, coco_refs),
    }
    if meteor:
        out["meteor"] = 100.0 * corpus_meteor(coco_hyps, coco_refs)
    out.update({
        "exact_match": sum(h in rs for h, rs in zip(hyps, refs)) / len(hyps),
        "prompts": len(hyps),
        "references": sum(len(rs) for rs in refs),
        "lowercase": lowercase,
        "bleu_signature": signature,
    })
    return out
