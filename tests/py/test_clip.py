"""Shortened texts in the command line and the demo end at a word, never mid-word."""

from __future__ import annotations

from ledgerq.cli.render import clip


def test_clip_ends_at_a_word_boundary_with_an_ellipsis() -> None:
    text = "payload does not match Charge: amount_cents: Input should be a valid integer"
    assert clip(text, 200) == text
    assert clip(text, 70) == "payload does not match Charge: amount_cents: Input should be a valid…"
    assert clip("x" * 50, 10) == "x" * 9 + "…"  # one word longer than the limit is cut
    assert (
        clip("ValueError: bad amount for the order\nTraceback ...", 25) == "ValueError: bad amount…"
    )
