"""compress.measure.interleaved: rounds long enough that one hiccup cannot move a median."""

from __future__ import annotations

import time

from compress.measure import interleaved


def test_a_fast_call_runs_often_enough_to_fill_its_round():
    count = {"fast": 0, "slow": 0}

    def call(name: str, s: float):
        def fn():
            count[name] += 1
            time.sleep(s)
        return fn

    ms = interleaved({"fast": call("fast", 0.001), "slow": call("slow", 0.02)}, rounds=3,
                     runs=2, warmup=1, min_round_s=0.06)
    assert len(ms["fast"]) == len(ms["slow"]) == 3
    assert 1 + 3 * 2 <= count["slow"] <= 1 + 3 * 3  # 60 ms a round / >= 20 ms a call
    assert count["fast"] >= 1 + 3 * 20  # dozens of runs, not 2
    assert all(f < s for f, s in zip(ms["fast"], ms["slow"], strict=True))


def test_turns_alternate_who_goes_first_and_return_what_each_call_measured():
    from compress.measure import in_turns

    seen = []
    out = in_turns({"a": lambda: seen.append("a") or 1.0, "b": lambda: seen.append("b") or 2.0},
                   rounds=3)
    assert seen == ["a", "b", "b", "a", "a", "b"]
    assert out == {"a": [1.0] * 3, "b": [2.0] * 3}
