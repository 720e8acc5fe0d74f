"""Does the teacher score exactly what the student sees? Tokenizer, template and vocabulary checks.

Token-level losses compare two distributions position by position, which only means
something when teacher and student share one tokenizer (same token ids, same boundaries) and
one chat template (same prompt text). A mismatch is an error here, never silently scored.
Output layers padded differently within one family (e.g. 151936 vs 152064 rows) are aligned
on the tokenizer's real vocabulary, and the alignment is reported.
"""

from __future__ import annotations

import hashlib
import json

from ..errors import StillhouseError


def vocab_fingerprint(tokenizer) -> str:
    """Hash of the token -> id map (special tokens included): equal iff ids mean the same text."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def template_fingerprint(tokenizer) -> str:
    return hashlib.sha256((getattr(tokenizer, "chat_template", None) or "").encode()).hexdigest()[:16]


def tokenizer_identity(tokenizer) -> dict:
    """What a logit cache records so a later reader can tell whether it was made for its tokens."""
    return {"vocab": vocab_fingerprint(tokenizer), "template": template_fingerprint(tokenizer), "size": len(tokenizer)}


def same_tokenizer(a, b) -> bool:
    return vocab_fingerprint(a) == vocab_fingerprint(b)


def check_token_level(student_tok, teacher_tok, where: str, student: str = "student", teacher: str = "teacher") -> None:
    """Raise unless a same-tokenizer loss between these two is meaningful."""
    if not same_tokenizer(student_tok, teacher_tok):
        raise StillhouseError(
            f"{where}: teacher '{teacher}' and student '{student}' have different tokenizers "
            f"({len(teacher_tok)} vs {len(student_tok)} tokens); token-level KD needs one tokenizer: "
            "use loss {sft: 1} on the teacher's text, or a cross-tokenizer loss (docs/onpolicy-and-cross-tokenizer.md)"
        )
    if template_fingerprint(student_tok) != template_fingerprint(teacher_tok):
        raise StillhouseError(
            f"{where}: teacher '{teacher}' and student '{student}' have different chat templates "
            f"({template_fingerprint(teacher_tok)} vs {template_fingerprint(student_tok)}); the teacher would score "
            "prompts the student never sees"
        )


def shared_vocab(tokenizer, *models) -> tuple[int, str | None]:
    """The vocabulary size to compare logits on, and a message when output layers are padded.

    Rows past the tokenizer's real vocabulary are padding that no text ever produces; logits
    are compared on the first len(tokenizer) rows of each model's output layer.
    """
    real = len(tokenizer)
    widths = [m.get_output_embeddings().weight.shape[0] for m in models]
    short = [w for w in widths if w < real]
    if short:
        raise StillhouseError(f"a model's output layer has {short[0]} rows, fewer than its tokenizer's {real} tokens")
    if any(w != real for w in widths):
        return real, f"aligning logits on the tokenizer's {real} tokens (output layers: {', '.join(map(str, widths))})"
    return real, None


def check_scored_text(tokenizer, rows: list[dict], where: str, sample: int = 16) -> None:
    """The dataset's token ids decode to its own prompt and completion text with this tokenizer.

    Catches a dataset tokenised by another model before anything is scored. Checked on a
    sample of rows (the first `sample`), which is enough to tell two vocabularies apart.
    """
    for r in rows[:sample]:
        prompt = tokenizer.decode(r["prompt_ids"], skip_special_tokens=False)
        completion = tokenizer.decode(r["completion_ids"], skip_special_tokens=True)
        # a BOS the encoder added is not part of the stored prompt text
        if not prompt.endswith(r["prompt"]) or completion.strip() != r["completion"].strip():
            raise StillhouseError(
                f"{where}: record {r.get('id', '?')} was tokenised by another tokenizer "
                "(its token ids do not decode to its text); the teacher must score the exact tokens the student sees"
            )
