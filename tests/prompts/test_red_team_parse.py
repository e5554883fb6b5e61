"""Step-1 completion parsers: well-formed, malformed and truncated continuations of each list."""

from __future__ import annotations

from selfalign.prompts.red_team_parse import parse_questions, parse_self_instruct, parse_topics


def test_parse_self_instruct_good_malformed_and_truncated():
    completion = (" Name three rivers in Europe.\n6. Input:\n<noinput>\n###\n"
                  "7. Instruction: Sort the numbers.\n7. Input:\n3, 1, 2\n###\n"
                  "8. Instruction: Say hello politely.\n8. Input:\n<noininput>\n###\n"
                  "9. Instruction:\n9. Input:\nan input without an instruction\n###\n"
                  "no numbering here\n###\n11. Instruction: Cut off by the tok")
    items = parse_self_instruct(completion, 6, "length", "<noinput>")
    assert items[:3] == [("Name three rivers in Europe.", ""), ("Sort the numbers.", "3, 1, 2"),
                         ("Say hello politely.", "")]  # a garbled <noinput> marker is no input
    assert all(isinstance(x, str) for x in items[3:]) and len(items) == 5  # 2 malformed, truncated dropped
    whole = parse_self_instruct(" Say hi please.\n6. Input:\n<noinput>\n", 6, "stop", "<noinput>")
    assert whole == [("Say hi please.", "")]


def test_parse_self_instruct_accepts_what_smollm_writes():
    """Seen in the embedded model's raw generations: the input number counts up, the model answers
    its own task ("Output:"), or writes no input line at all; an unlabelled second line stays malformed."""
    completion = (" Carry out a short census of the room.\n13. Input:\nThree chairs, one desk\n###\n"
                  "8. Instruction: Write a paragraph about yourself.\n8. Output:\nI am a model.\n###\n"
                  "9. Instruction: Provide a motto for a bakery.\n###\n"
                  "10. Instruction: Create the following product.\nThe 15 is 15 and it sold\n###\n"
                  "11. Instruction: List the words.\n11. Input:\nnNon\n12. Output: LINK\n###\n")
    items = parse_self_instruct(completion, 12, "stop", "<noinput>")
    assert items[:3] == [("Carry out a short census of the room.", "Three chairs, one desk"),
                         ("Write a paragraph about yourself.", ""), ("Provide a motto for a bakery.", "")]
    assert items[3] == "10. Instruction: Create the following product.\nThe 15 is 15 and it sold"
    assert isinstance(items[4], str) and len(items) == 5  # label debris inside the input


def test_parse_topics_numbered_list():
    comp = " Solar Storms\n7. Moon Landing\n\nrandom prose\n8) Tidal Waves\n9. Half A Top"
    assert parse_topics(comp, 6, "length", 20) == ["Solar Storms", "Moon Landing", None, "Tidal Waves"]
    assert parse_topics(comp, 6, "stop", 2) == ["Solar Storms", "Moon Landing"]


def test_parse_questions_first_per_new_pair_only():
    pairs = [("Questions about X", "Moon"), ("Questions about Y", "Sun")]
    opener = "6. type: Questions about X, topic: Moon, instruction:"
    comp = (" Who lives on the Moon?\n"
            "7. type: questions about y, topic: SUN, instruction: How hot is the Sun today?\n"
            "8. type: Questions about X, topic: Moon, instruction: Second try?\n"
            "1. type: Questions about Z, topic: Seed, instruction: Seed line\n"
            "9. type: Questions about Y, topic: Sun, instruction: cut off")
    found = parse_questions(comp, opener, "length", pairs)
    assert found == {pairs[0]: "Who lives on the Moon?", pairs[1]: "How hot is the Sun today?"}
