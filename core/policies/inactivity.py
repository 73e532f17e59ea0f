"""Inactive-conversation rules."""

from __future__ import annotations


def closing_message(inactivity_hours: int) -> str:
    """The system message left in a conversation closed for inactivity (days when the hours make whole days)."""
    if inactivity_hours % 24 == 0:
        days = inactivity_hours // 24
        span = f"{days} day{'s' if days != 1 else ''}"
    else:
        span = f"{inactivity_hours} hour{'s' if inactivity_hours != 1 else ''}"
    return f"Conversation closed automatically after {span} of inactivity."
