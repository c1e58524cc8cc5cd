"""Door-lock accuracy on labelled face crops: how often strangers get in (FAR), residents stay out (FRR).

This is the measure a door lock owner cares about, per attempt and against a whole household, not
the pairwise verification accuracy a model report gives: enrolling 30 people with 3 photos each means a
stranger is compared with 90 embeddings, so the per-attempt false-accept rate is higher than the
pairwise one at the same threshold. People are split into households of `household` people; each
enrolls its first `enroll` photos, attempts with its other photos (at most `max_attempts` each, so one
person with hundreds of photos does not dominate), and every stranger photo — people enrolled in no
household — is tried against every household.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from device.doorlock.decide import Gallery
from device.face import Cohort, threshold_at_far

Embed = Callable[[np.ndarray], np.ndarray]


@dataclass
class DoorTest:
    """Counts of one evaluation at one threshold; rates are derived from them."""

    threshold: float
    households: int = 0
    enrolled_people: int = 0
    genuine_attempts: int = 0
    genuine_refused: int = 0
    genuine_wrong_person: int = 0  # admitted, but as someone else of the household
    stranger_people: int = 0
    stranger_attempts: int = 0
    stranger_accepted: int = 0
    accepted_scores: list[float] = field(default_factory=list)  # distances, or normalised scores with a cohort

    @property
    def far(self) -> float:
        return self.stranger_accepted / max(1, self.stranger_attempts)

    @property
    def frr(self) -> float:
        return (self.genuine_refused + self.genuine_wrong_person) / max(1, self.genuine_attempts)

    def summary(self) -> dict[str, float | int]:
        return {"threshold": round(self.threshold, 4), "households": self.households,
                "enrolled_people": self.enrolled_people, "genuine_attempts": self.genuine_attempts,
                "genuine_refused": self.genuine_refused, "genuine_wrong_person": self.genuine_wrong_person,
                "frr": self.frr, "stranger_people": self.stranger_people, "stranger_attempts": self.stranger_attempts,
                "stranger_accepted": self.stranger_accepted, "far": self.far}


@dataclass
class Embedded:
    """Embeddings of the evaluation set, computed once and reused for every threshold."""

    households: list[dict[str, tuple[np.ndarray, np.ndarray]]]  # name -> (enrolled, attempts)
    strangers: list[np.ndarray]  # one (n, dim) array per stranger person


def embed_people(embed: Embed, residents: dict[str, list[np.ndarray]], strangers: dict[str, list[np.ndarray]],
                 household: int = 30, enroll: int = 3, max_attempts: int = 10,
                 progress: Callable[[int, int], None] | None = None) -> Embedded:
    """Embed the crops the evaluation needs. `residents` need more than `enroll` photos each."""
    names = sorted(n for n, crops in residents.items() if len(crops) > enroll)
    groups = [names[i:i + household] for i in range(0, len(names) - household + 1, household)]
    total = sum(min(len(residents[n]), enroll + max_attempts) for g in groups for n in g) + \
        sum(len(c) for c in strangers.values())
    done = 0

    def run(crops: list[np.ndarray]) -> np.ndarray:
        nonlocal done
        out = np.stack([embed(c) for c in crops])
        done += len(crops)
        if progress:
            progress(done, total)
        return out

    households = [{n: (run(residents[n][:enroll]), run(residents[n][enroll:enroll + max_attempts])) for n in g}
                  for g in groups]
    return Embedded(households, [run(crops) for crops in strangers.values() if crops])


def door_test(data: Embedded, threshold: float, cohort: Cohort | None = None) -> DoorTest:
    """Single-frame decisions of every attempt against its household's gallery at `threshold` (a distance,
    or with `cohort` a normalised score, as `Gallery` takes it)."""
    result = DoorTest(threshold, households=len(data.households), stranger_people=len(data.strangers))
    for house in data.households:
        gallery = Gallery([(name, v) for name, (enrolled, _) in house.items() for v in enrolled], cohort)
        result.enrolled_people += len(house)
        for name, (_, attempts) in house.items():
            for vector in attempts:
                match = gallery.match(vector, threshold)
                result.genuine_attempts += 1
                result.genuine_refused += match.person is None
                result.genuine_wrong_person += match.person is not None and match.person != name
        for vectors in data.strangers:
            for vector in vectors:
                match = gallery.match(vector, threshold)
                result.stranger_attempts += 1
                if match.person is not None:
                    result.stranger_accepted += 1
                    result.accepted_scores.append(match.distance if cohort is None else match.score)
    return result


def threshold_for_far(data: Embedded, far: float, cohort: Cohort | None = None) -> float:
    """The loosest threshold at which at most `far` of stranger attempts are accepted (per single frame).

    A stranger's attempt is accepted when its best match in the household passes the threshold, so the
    per-attempt FAR is a quantile of those best distances (or, with `cohort`, normalised scores).
    """
    best = []
    for house in data.households:
        gallery = Gallery([(name, v) for name, (enrolled, _) in house.items() for v in enrolled], cohort)
        for vectors in data.strangers:
            _, distances, scores = gallery.best(vectors)
            best.append(distances if cohort is None else -scores)  # smaller = closer in both cases
    limit = threshold_at_far(np.concatenate(best), far)  # ties at the line are refused together
    return limit if cohort is None else -limit
