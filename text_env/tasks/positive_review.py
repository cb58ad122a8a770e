"""positive-review: continue a templated movie-review opening positively (the offline counterpart of IMDB).

Openings are templated from titles, genres and neutral, mixed or negative lead-ins; the gold scorer is VADER.
"""

from __future__ import annotations

import itertools

import numpy as np

from text_env.tasks import Task, shipped_reward_model

__all__ = ["make_task"]

_TITLES = [
    "The Last Harbor",
    "Midnight in Ashford",
    "Glass Mountains",
    "The Quiet Engineer",
    "Red Sky Over Dunmore",
    "Paper Lanterns",
    "The Long Winter",
    "Operation Nightfall",
    "A House by the River",
    "Saltwater",
    "The Clockmaker's Daughter",
    "Iron Orchard",
    "Before the Storm",
    "The Velvet Room",
    "Northbound",
    "Second Chances",
    "The Hollow Crown of Elm Street",
    "Starlight Diner",
    "The Forgotten Coast",
    "Wild Horses",
]
_GENRES = [
    "thriller",
    "romantic comedy",
    "war drama",
    "science fiction film",
    "family movie",
    "horror film",
    "documentary",
    "crime drama",
    "musical",
    "period piece",
]
_OPENINGS = [
    # neutral lead-ins
    "I watched {title} last night, and",
    "{title} is a {genre} that runs just over two hours. The story",
    "I went into {title} knowing almost nothing about it. The first scene",
    "My friend recommended {title}, a {genre}, so I gave it a try. The acting",
    "{title} follows a small-town family over one long summer. The direction",
    "I saw {title} at a late screening with a half-empty theater. The plot",
    "The new {genre} {title} opened this weekend. As for the script,",
    "{title} is the director's third feature. Visually,",
    "I rented {title} on a rainy Sunday afternoon. The soundtrack",
    "{title}, a {genre} set in the 1970s, tells the story of two brothers. Overall,",
    # mixed lead-ins
    "I had mixed feelings going into {title}, and honestly",
    "The trailer for {title} promised a lot, but the actual {genre}",
    "Some critics loved {title} while others hated it. In my view,",
    "{title} has a strong cast, although the pacing",
    "Parts of {title} drag, yet the final act",
    "I expected more from {title}, a {genre} with a big budget. Still,",
    "{title} is uneven: the first half is slow, and the second half",
    "The reviews for {title} were lukewarm, so my expectations were low. The {genre}",
    # negative lead-ins
    "I almost walked out of {title} in the first twenty minutes, but",
    "{title} was a disappointment for most of the audience. The dialogue",
    "After the boring opening of {title}, I was ready to give up. Then",
    "The worst thing about {title} is the runtime. The characters",
    "I was tired and grumpy when I sat down to watch {title}. The {genre}",
    "{title} got terrible reviews, and the first scenes explain why. However,",
    "The sound in the theater was awful during {title}, and the film itself",
]


def make_task() -> Task:
    """The positive-review task: 400 templated movie-review openings (320 train, 80 eval), judged by VADER."""
    from text_env.rewards.gold import VaderSentiment

    combos = [
        opening.format(title=title, genre=genre)
        for opening, title, genre in itertools.product(_OPENINGS, _TITLES, _GENRES)
    ]
    openings = list(dict.fromkeys(combos))  # openings without {genre} repeat across genres
    rng = np.random.default_rng(20261124)
    picked = [openings[i] for i in rng.permutation(len(openings))[:400]]
    return Task(
        name="positive-review",
        description=__doc__.strip().splitlines()[0],  # the module docstring's summary line
        recommended="PPO: no references, so no supervised step",
        train_prompts=picked[:320],
        eval_prompts=picked[320:],
        make_gold=VaderSentiment,
        instruction="Write a short review of a movie you watched.",
        max_new_tokens=32,
        max_prompt_tokens=72,  # the longest opening is 69 tokens inside SmolLM2's chat template
        reward_model=shipped_reward_model("positive-review"),
    )
