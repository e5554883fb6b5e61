"""Filter predicates: each returns its named reason on the bad case and None on the good one."""

from __future__ import annotations

from types import SimpleNamespace

from selfalign import filters

from selfalign.filters import (
    apply_filters,
    count_reasons,
    instruction_length,
    no_blacklisted_words,
    starts_cleanly,
    topic_filters,
)


# --- instruction filters (step 1) ----------------------------------------------------------------
def _item(text: str, inp: str = "") -> SimpleNamespace:
    return SimpleNamespace(text=text, input=inp)


def test_instruction_length_window_is_exclusive_below_inclusive_above():
    pred = instruction_length(3, 6)
    assert pred(_item("Write a poem.")) == "too_short"
    assert pred(_item("Write a poem now.")) is None  # 4 words > 3
    assert pred(_item("one two three four five six")) is None  # 6 <= 6
    assert pred(_item("one two three four five six seven")) == "too_long"


def test_blacklist_whole_words_any_case_in_instruction_or_input():
    pred = no_blacklisted_words(["image", "go to", "map"])
    assert pred(_item("Describe this IMAGE in detail please")) == "blacklist"
    assert pred(_item("Explain the route", "Go   to the station first")) == "blacklist"
    assert pred(_item("Summarise the text", "A map of the town")) == "blacklist"
    assert pred(_item("Explain imagery in poetry and bitmaps")) is None  # not whole words
    assert pred(_item("Tell me where to go tomorrow")) is None
    assert no_blacklisted_words([])(_item("Draw an image")) is None


def test_starts_cleanly():
    assert starts_cleanly(_item("- Write a list of fruits")) == "bad_start"
    assert starts_cleanly(_item("¿Qué hora es en Madrid?")) == "bad_start"
    assert starts_cleanly(_item("   ")) == "empty"
    assert starts_cleanly(_item("3 ways to save money at home")) is None
    assert starts_cleanly(_item("  Write a haiku about rain")) is None


def test_topic_filters_each_reason():
    preds = topic_filters(max_words=3)
    assert apply_filters("", preds) == "topic_empty"
    assert apply_filters("Very Long Topic Name Here", preds) == "topic_too_long"
    assert apply_filters("wedding customs", preds) == "topic_not_capitalised"
    assert apply_filters("Éclair Recipes", preds) == "topic_not_capitalised"
    assert apply_filters("Wedding Customs.", preds) == "topic_punctuation"
    assert apply_filters("Wedding Customs", preds) is None


def test_topic_filters_reject_loops_lists_and_the_type_name():
    preds = topic_filters(max_words=3, type_name="famous_people")
    assert apply_filters("Sports, Sports, Sports", preds) == "topic_list"
    assert apply_filters("Music; Dance", preds) == "topic_list"
    assert apply_filters("Electronics and Electronics", preds) == "topic_repeated_word"
    assert apply_filters("Culture of culture", preds) == "topic_repeated_word"
    assert apply_filters("Famous People", preds) == "topic_is_type"
    assert apply_filters("Famous People Abroad", preds) is None
    assert apply_filters("Art of Art", preds) is None  # words of 3 letters or fewer may repeat
    assert apply_filters("Famous People", topic_filters(max_words=3)) is None  # no type given
    assert apply_filters("18th Century Art", preds) is None  # a leading number is fine
    assert apply_filters("5 ways cooking", preds) == "topic_not_capitalised"


def test_filters_apply_in_order_and_count():
    preds = [instruction_length(3, 150), no_blacklisted_words(["image"]), starts_cleanly]
    reasons = [apply_filters(_item(t), preds) for t in ("image", "- Draw an image of cats", "Keep this one please")]
    assert reasons == ["too_short", "blacklist", None]
    assert count_reasons(["a", "b", "a"]) == {"a": 2, "b": 1}


def test_repeats_chunk_drops_loops_not_prose():
    pred = filters.repeats_chunk(3, 3)
    assert pred(filters.Answer("A choir, a choir, a choir, a choir sings.", True)) == "loop"
    assert pred(filters.Answer("One of the best parks is one of the oldest; it is one of a kind.", True)) is None
    numbered = "1. Mix the flour. 2. Mix the eggs. 3. Mix the milk."
    assert pred(filters.Answer(numbered, True)) is None


def test_copies_any_matches_a_run_of_any_source():
    pred = filters.copies_any(["the quick brown fox jumps", "lorem ipsum dolor sit amet"], 4, "copied")
    assert pred(filters.Answer("Well, lorem ipsum dolor sit is old.", True)) == "copied"
    assert pred(filters.Answer("The quick brown cat jumps.", True)) is None
    assert filters.copies_any([], 4, "copied")(filters.Answer("anything at all here", True)) is None


def test_complies_with_harm_only_on_harmful_prompts():
    refusal = (r"\bi (won't|will not) help\b",)
    helps = filters.Answer("Mix the two liquids in a bottle.", True)
    assert filters.complies_with_harm(refusal, True)(helps) == "harmful_compliance"
    assert filters.complies_with_harm(refusal, False)(helps) is None
    assert filters.complies_with_harm(refusal, True)(filters.Answer("I won't help with that.", True)) is None
