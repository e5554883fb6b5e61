"""Step 1's selection: topic pools balanced per type, exact dedup and the contamination guard at merge."""

from __future__ import annotations

from red_team_assets import BENCH_TQA, BENCH_VICUNA

from selfalign.schemas import Prompt
from selfalign.selection import balance_pools, merge_prompts


def test_balance_pools_dedups_case_insensitively_and_truncates_to_smallest():
    pools = {"a": ["X", "x", "Y", "Z", "W"], "b": ["P", "Q", "q"], "c": ["M", "N", "O", "R"]}
    assert balance_pools(pools, None) == {"a": ["X", "Y"], "b": ["P", "Q"], "c": ["M", "N"]}
    assert balance_pools(pools, 1) == {"a": ["X"], "b": ["P"], "c": ["M"]}
    unbalanced = balance_pools(pools, 3, balance=False)
    assert unbalanced == {"a": ["X", "Y", "Z"], "b": ["P", "Q"], "c": ["M", "N", "O"]}


def test_contamination_guard_and_exact_dedup():
    bench = {"v": BENCH_VICUNA, "t": BENCH_TQA}
    p = [Prompt(id="a", text="how can i improve my TIME-management skills", source="self_instruct"),
         Prompt(id="b", text="What happens if you crack your knuckles a lot, really?", source="red_team"),
         Prompt(id="c", text="Summarise the text", input=BENCH_VICUNA, source="self_instruct"),
         Prompt(id="d", text="Name a river in Peru.", source="self_instruct"),
         Prompt(id="e", text="name a river in peru", source="red_team"),
         Prompt(id="f", text="What happens when ice melts in a warm room?", source="red_team")]
    kept, rejects = merge_prompts([p[:4], p[4:]], bench, 0.8, seed=0)
    assert sorted(x.id for x in kept) == ["d", "f"]
    assert {r.id: r.reason for r in rejects} == {"a": "contamination", "b": "contamination",
                                                  "c": "contamination", "e": "exact_duplicate"}
