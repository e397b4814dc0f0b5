"""An ordinary chat workload: open questions with nothing to copy from the prompt, so
prompt lookup finds little and a draft model has to guess the answer itself."""

from __future__ import annotations

QUESTIONS = (
    "Why do leaves change colour in autumn?",
    "Give me three tips for writing a clear email to a colleague.",
    "How does a refrigerator keep food cold?",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Explain what a prime number is to a ten-year-old.",
    "What are the main causes of inflation?",
    "Suggest a simple dinner I can cook in twenty minutes.",
    "How do vaccines help the body fight disease?",
    "Write a short poem about the sea at night.",
    "What is the difference between weather and climate?",
    "How can I get better at remembering people's names?",
    "Why is the sky blue during the day and red at sunset?",
    "Describe how a bill becomes a law in a democracy.",
    "What are some good habits for studying for an exam?",
    "How does a bicycle stay upright when it moves?",
    "Tell me a short story about a robot who learns to paint.",
)


def chat_messages(num: int) -> list[list[dict[str, str]]]:
    """num single-turn chats, cycling through QUESTIONS."""
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(num)]
