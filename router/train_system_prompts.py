"""The text of the synthetic training examples: the system prompts apps set and the requests that
name no task (router/train_data.py builds the examples and adds them to the datasets' prompts).

The datasets are system-less; real traffic is not. These teach the classifier that a system prompt
can carry the task ("You are a coding assistant" + "can you help me?" is code) and that a style-only
one does not.
"""

from __future__ import annotations

import random

TASK_SYSTEM_PROMPTS = {
    "math": (
        "You are an expert mathematician. Solve the problem step by step and put the final answer in \\boxed{}.",
        "You are a patient math tutor.",
        "You help students with algebra, geometry and calculus homework. Show your work.",
        "Act as a math olympiad coach. Give rigorous solutions.",
    ),
    "code": (
        "You are an expert Python programmer. Reply with code only.",
        "You are a senior software engineer who writes clean, well-tested code.",
        "You are a coding assistant. Help the user debug and write programs.",
        "Act as a code reviewer and programming tutor for JavaScript, Python and SQL.",
    ),
    "reasoning": (
        "You are a careful logical reasoner. Think through the puzzle before answering.",
        "Answer the question with the letter of the correct option after reasoning about it.",
        "You solve logic puzzles, riddles and deduction problems step by step.",
        "Act as a puzzle master: reason carefully about the constraints before giving an answer.",
    ),
    "knowledge": (
        "You are a knowledgeable assistant. Answer factual questions accurately.",
        "You are an encyclopedia. Give the factual answer.",
        "You are a trivia expert who answers questions about history, geography, science and culture.",
        "Act as a reference librarian: give accurate facts and name the source if you know it.",
    ),
    "writing": (
        "You are a professional writer and editor.",
        "You are a copywriter who writes clear, engaging text.",
        "You help users draft emails, essays, stories and social media posts.",
        "Act as an editor: rewrite, shorten, or polish the user's text while keeping its meaning.",
    ),
    "chat": (
        "You are a friendly companion who enjoys casual conversation.",
        "You are a chatty, warm conversational partner. Keep the conversation going.",
        "You are a friendly chatbot for small talk. Be casual and fun.",
        "Act as the user's buddy: chat about their day, hobbies and interests.",
    ),
}
# Roles and instructions combined into varied system prompts for the synthetic examples, so that
# the model learns the words of a role ("programmer", "tutor") and not a handful of exact strings.
TASK_ROLES = {
    "math": ("mathematician", "math tutor", "math homework helper", "statistics professor", "calculus teacher", "algebra tutor"),
    "code": ("programmer", "software engineer", "coding assistant", "Python developer", "programming tutor", "code reviewer"),
    "reasoning": ("logician", "puzzle solver", "logic tutor", "riddle master", "detective who reasons step by step", "critical thinking coach"),
    "knowledge": ("encyclopedia", "trivia expert", "reference librarian", "historian", "fact-checker", "quiz master who knows the answers"),
    "writing": ("writer", "editor", "copywriter", "proofreader", "ghostwriter", "writing coach"),
    "chat": ("friend", "chat buddy", "friendly companion", "casual conversation partner", "pen pal", "cheerful chatbot"),
}
TASK_INSTRUCTIONS = {
    "math": ("Show every step of the calculation.", "Give the final numeric answer.", "Explain the math clearly."),
    "code": ("Write correct, idiomatic code.", "Include code in fenced blocks.", "Explain bugs and how to fix them."),
    "reasoning": ("Work through the logic before answering.", "Check each constraint of the puzzle.", "Explain your deduction."),
    "knowledge": ("Answer with accurate facts.", "Be factual.", "Say when you are unsure of a fact."),
    "writing": ("Polish the user's text.", "Write in a clear, engaging style.", "Keep the user's voice."),
    "chat": ("Keep it casual and friendly.", "Ask the user about their day.", "Be warm and chatty."),
}
ROLE_OPENERS = ("You are a", "You are an experienced", "Act as a", "You're a helpful", "Role:")


def synthetic_system_prompt(task: str, rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(TASK_SYSTEM_PROMPTS[task])
    text = f"{rng.choice(ROLE_OPENERS)} {rng.choice(TASK_ROLES[task])}."
    return text + (" " + rng.choice(TASK_INSTRUCTIONS[task]) if rng.random() < 0.7 else "")


# Requests that say nothing about their task: with one of these, only the system prompt can tell.
AMBIGUOUS_REQUESTS = (
    "Can you help me with this one? I have been stuck on it for an hour.",
    "Help me with this, please.",
    "I need your help.",
    "Here is my next one.",
    "Please take a look at this.",
    "What do you think?",
    "Let's get started.",
    "Can you do this for me?",
    "Okay, next question.",
    "I have a question for you.",
    "Could you help me out?",
    "Go ahead.",
    "Please continue.",
    "Another one, please.",
    "Ready when you are.",
    "Let's try a different one.",
    # Question-form requests: without them "what is ...?" alone reads as a factual question, and a
    # short question under a task's system prompt is classified knowledge.
    "What's the answer to this one?",
    "What would you say?",
    "Is this right?",
    "How would you do it?",
    "Which one is correct?",
    "What comes next?",
    "Can you solve it?",
    "How do I start?",
    "What's the result here?",
    "Why is that?",
    "What is your answer?",
    "Tell me the answer.",
    "What is the next step?",
)
# Style only: they go with prompts of every type (augment). A task's prompts above must not carry style
# words either: "briefly" in knowledge's made "Be brief." as a system prompt send most requests to
# knowledge (docs/classifier.md, "Natural prompts").
GENERIC_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful, respectful and honest assistant.",
    "Be concise.",
    "You are an AI assistant. Answer in English.",
)
