"""Response filters (step 2 / step 4): turn-end cut, repetition cut, partial word, and the predicates."""

from selfalign import filters
from selfalign.filters import Answer


def test_cut_turn_end_takes_earliest_marker():
    text = "Paris is the capital.\nUser: thanks\n### User\nmore"
    assert filters.cut_turn_end(text, ["### User", "\nUser:"]) == ("Paris is the capital.", True)
    assert filters.cut_turn_end("no marker here ", ["\nUser:"]) == ("no marker here ", False)
    assert filters.cut_turn_end("x", []) == ("x", False)


def test_repetition_cut_stops_at_first_repeated_chunk():
    loop = "I like cats. They are soft. I like cats. They are soft. I like"
    assert filters.repetition_cut(loop, 5) == "I like cats. They are soft."
    lines = "Step one is easy\nStep two is hard\nStep one is easy\n"
    assert filters.repetition_cut(lines, 5) == "Step one is easy\nStep two is hard"
    # a loop that changes only its delimiter is still a loop (seen on SmolLM2-135M)
    seen = "I am a human, I am going to the bar, I am going to the bar. I am going"
    assert filters.repetition_cut(seen, 5) == "I am a human, I am going to the bar,"


def test_repetition_cut_lets_short_chunks_repeat():
    listing = "1. Apples are red.\n2. Pears are green.\n3. Plums are purple."
    assert filters.repetition_cut(listing, 5) == listing  # "1." "2." are below the threshold
    assert filters.repetition_cut("Yes, yes, yes, fine.", 5) == "Yes, yes, yes, fine."
    assert filters.repetition_cut("Yes, yes, yes, fine.", 1) == "Yes, yes,"  # " yes," repeats
    assert filters.repetition_cut("", 5) == ""


def test_repetition_cut_treats_backticks_as_boundaries():
    text = "Use `print(x)` here and `print(x)` there."
    # a chunk ends *after* its delimiter, so the opening backtick stays with the text before it
    assert filters.repetition_cut(text, 3) == "Use `print(x)` here and `"


def test_drop_partial_word():
    assert filters.drop_partial_word("The answer is forty-tw") == "The answer is"
    assert filters.drop_partial_word("line one\nhalfwor") == "line one"
    assert filters.drop_partial_word("single") == ""


def test_clean_answer_natural_end_truncation_and_loop():
    natural = filters.clean_answer("A full answer.\nUser: next", ended=False, markers=["\nUser:"])
    assert (natural.text, natural.complete, natural.repeated) == ("A full answer.", True, False)
    by_eos = filters.clean_answer("Ends on EOS", ended=True, markers=["\nUser:"])
    assert (by_eos.text, by_eos.complete) == ("Ends on EOS", True)
    truncated = filters.clean_answer("Cut by the token lim", ended=False, markers=["\nUser:"])
    assert (truncated.text, truncated.complete) == ("Cut by the token", False)
    looped = filters.clean_answer("It is a cat. It is a cat. It is", ended=False, markers=[], min_chunk_chars=5)
    assert (looped.text, looped.complete, looped.repeated) == ("It is a cat.", False, True)


def test_min_answer_chars_spares_only_truncated_answers():
    check = filters.min_answer_chars(20)
    assert check(Answer("short", True)) == "too_short"
    assert check(Answer("short", False, repeated=True)) == "too_short"
    assert check(Answer("short", False)) is None
    assert check(Answer("x" * 20, True)) is None


def test_contains_any_and_opens_with_any_are_case_insensitive():
    leak = filters.contains_any(["Red Panda", ""], "leak_exemplar")
    assert leak(Answer("the RED PANDA is cute", True)) == "leak_exemplar"
    assert leak(Answer("a giant panda", True)) is None
    apology = filters.opens_with_any(["I'm sorry", "Sorry"], "apology")
    assert apology(Answer("  sorry, I cannot", True)) == "apology"
    assert apology(Answer("I am happy to help; sorry for the wait", True)) is None
    assert filters.opens_with_any([], "apology")(Answer("Sorry", True)) is None
    assert filters.empty_answer(Answer(" \n", True)) == "empty"


def test_apply_filters_reports_first_reason_in_order():
    preds = [filters.empty_answer, filters.contains_any(["bad"], "leak"), filters.min_answer_chars(100)]
    assert filters.apply_filters(Answer("bad and short", True), preds) == "leak"
    assert filters.apply_filters(Answer("fine but short", True), preds) == "too_short"


def test_refusal_predicates_judge_refusals_only():
    refusal = [r"\bi won't help\b"]
    judged = filters.unjudged_refusal(refusal, [r"\bdangerous\b"], "The request is dangerous.")
    unjudged = filters.unjudged_refusal(refusal, [r"\bdangerous\b"], "The user asks about cars.")
    assert judged(Answer("I won't help with that.", True)) is None
    assert unjudged(Answer("I WON'T HELP with that.", True)) == "unjudged_refusal"
    assert unjudged(Answer("Cars need oil changes.", True)) is None  # not a refusal: nothing to judge
    assert filters.refusal_of_benign(refusal, harmful_prompt=False)(Answer("I won't help.", True)) == "refusal_benign"
    assert filters.refusal_of_benign(refusal, harmful_prompt=True)(Answer("I won't help.", True)) is None
    assert filters.refusal_of_benign(refusal, harmful_prompt=False)(Answer("Sure, here it is.", True)) is None
