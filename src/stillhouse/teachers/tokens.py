"""Token facts a remote backend needs from a tokenizer alone (no model config at hand)."""

from __future__ import annotations

END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")


def end_of_turn_ids(tokenizer) -> set[int]:
    """Ids that end a completion: EOS and the chat templates' end-of-turn tokens the vocabulary has."""
    if tokenizer is None:
        return set()
    ids = {tokenizer.eos_token_id}
    for t in END_OF_TURN:
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return {i for i in ids if i is not None}
