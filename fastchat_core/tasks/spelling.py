"""Generated spelling tasks: count a letter in a word, and spell a word letter by letter.

Small models see words as a few tokens, not letters, so both skills need teaching. Each reply first works
letter by letter in text, then checks itself with the Python tool; the python_output part is exactly what
the engine's sandbox prints for that code (the REPL repr), so training matches inference.
Conversation i depends only on (seed, i): use different seeds for training and validation.
"""
from fastchat_core.tasks.base import GeneratedTask

# Common English words of many lengths, several with repeated letters (the hard cases for counting).
WORDS = """
apple banana cherry strawberry raspberry blueberry orange lemon mango melon grape pineapple coconut peach
pear plum apricot avocado tomato potato carrot onion garlic pepper cabbage lettuce broccoli spinach pumpkin
bread butter cheese coffee cookie chocolate honey pizza pasta noodle sandwich breakfast dinner kitchen
table chair window door floor ceiling bottle pillow blanket mirror letter paper pencil notebook library
school teacher student science history language grammar sentence question answer example problem number
mississippi tennessee massachusetts connecticut committee bookkeeper balloon address accommodate
necessary occasion possession embarrass millennium parallel recommend tomorrow success assessment
mountain river ocean island desert forest valley village city country planet galaxy universe weather
thunder lightning rainbow blizzard hurricane volcano earthquake summer winter autumn spring morning evening
elephant giraffe kangaroo penguin dolphin octopus squirrel rabbit hamster turtle butterfly mosquito
crocodile chimpanzee hippopotamus rhinoceros cheetah gorilla parrot pigeon sparrow falcon eagle owl
computer keyboard program function variable algorithm database network internet software hardware
engineer developer python javascript compiler terminal browser password battery charger monitor
happy sad angry excited nervous curious careful grateful beautiful wonderful terrible horrible
difficult different important interesting comfortable independent responsible remember understand
believe receive achieve separate definitely government environment restaurant vacuum rhythm queue
bicycle motorcycle airplane helicopter submarine railway station airport luggage passenger journey
guitar piano violin trumpet drummer orchestra melody harmony concert ballet theater museum gallery
doctor nurse hospital medicine vitamin exercise muscle skeleton stomach shoulder elbow finger
friend family brother sister mother father grandmother cousin neighbor stranger wedding birthday
silly jelly puzzle pizzazz bubble giggle toffee yellow hello llama assassin sassafras
""".split()

COUNT_QUESTIONS = (
    "How many {letter}'s are in {word}?",
    "How many times does the letter {letter} appear in the word {word}?",
    "Count the letter '{letter}' in \"{word}\".",
    "In the word {word}, how many {letter} are there?",
    "how many {letter} in {word}",
    "Can you tell me how many '{letter}' the word '{word}' has?",
)
SPELL_QUESTIONS = (
    "Spell the word {word}.",
    "How do you spell {word}?",
    "Can you spell {word} letter by letter?",
    "spell {word}",
    "Please spell out \"{word}\" one letter at a time.",
)


class SpellingCount(GeneratedTask):
    """"How many r in strawberry?": spell, mark the positions, count, check with str.count in Python."""

    kind = "count"

    def make(self, rng):
        word = rng.choice(WORDS)
        # mostly a letter of the word; sometimes one it lacks, whose answer is 0
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        positions = [str(k + 1) for k, c in enumerate(word) if c == letter]
        n = len(positions)
        if n:
            where = f"The '{letter}' is at position{'s' if n > 1 else ''} {', '.join(positions)}, so I count {n}."
        else:
            where = f"There is no '{letter}' in it, so I count 0."
        parts = [
            {"type": "text", "text": f"Spelling {word} out: {', '.join(word)}.\n{where}\nLet me check with Python: "},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(n)},
            {"type": "text", "text": f"\n\nThe letter '{letter}' appears {n} time{'' if n == 1 else 's'} in "
                                     f"\"{word}\"."},
        ]
        question = rng.choice(COUNT_QUESTIONS).format(letter=letter, word=word)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": n}


class Spelling(GeneratedTask):
    """"Spell banana": the letters joined by hyphens, checked with '-'.join in Python."""

    kind = "spell"

    def make(self, rng):
        word = rng.choice(WORDS)
        spelled = "-".join(word)
        parts = [
            {"type": "text", "text": f"{word} is spelled {spelled}. Let me check with Python: "},
            {"type": "python", "text": f"'-'.join('{word}')"},
            {"type": "python_output", "text": repr(spelled)},
            {"type": "text", "text": f"\n\nSo \"{word}\" has {len(word)} letters: {spelled}."},
        ]
        question = rng.choice(SPELL_QUESTIONS).format(word=word)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": spelled}
