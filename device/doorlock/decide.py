"""Deciding whether to unlock: per-frame matching, N-of-M voting, rate limits, and a motion liveness check.

The rules that matter for safety, and why:

- A face matches a person only when its score against one of that person's enrolled embeddings passes
  the threshold calibrated on the deployed model: the cohort-normalised score when the config names a
  bundle threshold and the bundle carries a cohort, else the raw distance (a number in the config is
  always a distance). An unknown face is refused; there is no "nearest enrolled person wins", the
  classic way such locks admit strangers.
- One frame never unlocks: the same person must be matched in `votes_needed` of the last `window`
  frames with a face, which turns a rare per-frame false match into a much rarer unlock.
- After `max_attempts` refusals within `attempt_window_s` the lock ignores everyone for
  `lockout_s`, which limits how many tries a stranger (or a set of photos) gets.
- Liveness: the face crops of the frames that matched the unlocking person must change by at least
  `min_motion` grey levels on average *after* each has been aligned onto the first by an affine warp and
  matched in brightness and contrast (`motion`). A held photo only moves rigidly (and the detector's box
  jitters around it), which the alignment removes; a live face changes non-rigidly (blinks, expression,
  head rotation against the background). This catches a still or hand-shifted flat picture and nothing
  more; see the README for what it misses.
- A face that leaves before a decision (no face for `idle_reset_s`) is an *abandoned* attempt: audited, and
  counted towards the lockout like a refusal when it had at least `votes_needed` frames, or a stranger could try
  without limit by stepping away after every few frames. Shorter ones (a passer-by glimpsed for a frame) could
  never have opened the door and are not counted, or passers-by would lock the residents out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from device.doorlock.config import DecisionConfig, LivenessConfig
from device.face import Cohort


@dataclass(frozen=True)
class Match:
    """Best match of one face against the gallery: `person` is None unless it passes the threshold.

    `distance` is the raw distance to the best enrolled embedding (what the audit log shows); `score` is
    the cohort-normalised score that decided, when the gallery normalises (None otherwise).
    """

    person: str | None
    nearest: str | None
    distance: float
    score: float | None = None


class Gallery:
    """All enrolled embeddings in one matrix, so a frame costs one matrix product whatever the head count.

    Without a cohort, `threshold` is a distance (accept when the nearest is within it); with one (the
    bundle's `Cohort`), it is a normalised score (accept when the best score reaches it).
    """

    def __init__(self, entries: list[tuple[str, np.ndarray]], cohort: Cohort | None = None):
        self.names = [name for name, _ in entries]
        self.people = sorted(set(self.names))
        dim = entries[0][1].shape[-1] if entries else 0
        self.vectors = np.stack([v for _, v in entries]).astype(np.float32) if entries else np.zeros((0, dim), np.float32)
        self.cohort = cohort
        # Enrolled embeddings' cohort statistics, computed once rather than per frame.
        self._stats = cohort.stats(self.vectors) if cohort is not None and entries else None

    def __len__(self) -> int:
        return len(self.names)

    def best(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """For each row of `embeddings`: index of the best enrolled vector, its distance, and its score."""
        if not self.names:
            raise ValueError("the gallery is empty: nobody is enrolled for this model")
        probes = np.atleast_2d(np.asarray(embeddings, np.float32))
        sims = probes @ self.vectors.T  # one product per frame, shared by the distance and the score
        scores = None
        if self.cohort is not None:
            scores = self.cohort.normalise(sims, self.cohort.stats(probes), self._stats)
        best = np.argmax(scores if scores is not None else sims, axis=1)
        rows = np.arange(len(best))
        # Unit vectors: |a - b|^2 = 2 - 2 a.b, so one dot product per enrolled vector.
        distances = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims[rows, best]))
        return best, distances, (scores[rows, best] if scores is not None else None)

    def match(self, embedding: np.ndarray, threshold: float) -> Match:
        """Best enrolled embedding; a person only when it is within `threshold` (see the class doc)."""
        if not self.names:
            return Match(None, None, float("inf"))
        best, distances, scores = self.best(embedding)
        name, distance = self.names[int(best[0])], float(distances[0])
        if scores is None:
            return Match(name if distance <= threshold else None, name, distance)
        score = float(scores[0])
        return Match(name if score >= threshold else None, name, distance, score)


# Liveness measure. The crops are brought to one sharpness, smoothed so that sensor noise and the rest of a blur
# difference average out (sigma 3: a one-frame motion blur of 9 px stays under min_motion, two photos of one person
# still score 18-47), aligned by ECC with an affine model (shift, scale, rotation, shear: a photo moved by hand in
# its own plane, and Haar box jitter), then compared inside a margin that the warp's border cannot reach.
_MOTION_BLUR_SIGMA = 3.0
_MOTION_MARGIN = 12
_ECC_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-5)


def aligned_change(reference: np.ndarray, crop: np.ndarray) -> float:
    """Mean absolute grey-level difference left after warping `crop` onto `reference` (affine) and matching its
    brightness and contrast: what a rigid move or a lighting change of a flat picture cannot explain.

    When ECC cannot align the two (no correlation: different content), the unaligned difference is used —
    such a pair is not a still picture.
    """
    a, b = _equally_sharp(reference.astype(np.float32), crop.astype(np.float32))
    a = cv2.GaussianBlur(a, (0, 0), _MOTION_BLUR_SIGMA)
    b = cv2.GaussianBlur(b, (0, 0), _MOTION_BLUR_SIGMA)
    warp = np.eye(2, 3, dtype=np.float32)
    try:
        _, warp = cv2.findTransformECC(a, b, warp, cv2.MOTION_AFFINE, _ECC_CRITERIA, None, 1)
    except cv2.error:
        warp = np.eye(2, 3, dtype=np.float32)
    height, width = a.shape
    b = cv2.warpAffine(b, warp, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REPLICATE)
    m = _MOTION_MARGIN
    a, b = a[m:-m, m:-m], b[m:-m, m:-m]
    b = (b - b.mean()) / (b.std() + 1e-6) * a.std() + a.mean()
    return float(np.abs(a - b).mean())


def _sharpness(image: np.ndarray) -> float:
    return float(cv2.Laplacian(image, cv2.CV_32F).var())


def _equally_sharp(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sharper crop blurred until it is no sharper than the other. A photo flicked sideways in one frame is
    motion-blurred there, and blur is a change no affine warp undoes: without this, one blurred frame of a
    still photo measured 3-5 grey levels (a review finding), more than a live face needs."""
    if _sharpness(a) < _sharpness(b):
        b, a = _equally_sharp(b, a)
        return a, b
    target = _sharpness(b)
    for sigma in _SOFTEN_SIGMAS:
        if _sharpness(a) <= target:
            break
        a = cv2.GaussianBlur(a, (0, 0), sigma)
    return a, b


_SOFTEN_SIGMAS = (0.5, 0.5, 0.75, 1.0, 1.0, 1.5, 2.0, 3.0)  # successive blurs: sigmas add in quadrature


def motion(crops: list[np.ndarray]) -> float:
    """Largest non-rigid change of any later face crop against the first one (0 for a still picture).

    Against the first rather than the previous crop, so that a slow live change (a face turning over five
    frames) adds up instead of being split into steps each too small to tell from noise. The largest, because a
    live change can be a single frame (a blink); so one odd frame of a still picture (a finger crossing it, a
    flick strong enough to blur it) can pass too, which the README lists among what this does not stop.
    """
    if len(crops) < 2:
        return 0.0
    return max(aligned_change(crops[0], c) for c in crops[1:])


@dataclass(frozen=True)
class Decision:
    """What happened to one attempt: `action` is unlock, deny, not_live (liveness failed) or abandoned (the face
    left before a decision); deny and not_live count as refusals towards the lockout, and so does an abandoned
    attempt that had at least `votes_needed` frames (enough to have unlocked)."""

    action: str
    person: str | None
    distance: float
    frames: int
    motion: float
    reason: str
    score: float | None = None  # best normalised score of the frames used, when the gallery normalises


@dataclass
class _Vote:
    match: Match
    crop: np.ndarray


@dataclass
class Decider:
    """Turns a stream of per-frame matches into unlock / deny decisions, with voting and rate limits.

    Time is passed in (`now`, seconds) rather than read from a clock, so the rules are testable and
    the service can use a monotonic clock.
    """

    decision: DecisionConfig
    liveness: LivenessConfig
    _votes: deque = field(default_factory=deque)
    _last_face: float = float("-inf")
    _blocked_until: float = float("-inf")
    _block_reason: str = ""
    _denials: deque = field(default_factory=deque)

    def blocked(self, now: float) -> str | None:
        """Why faces are being ignored right now ('cooldown' or 'lockout'), or None."""
        if now < self._blocked_until:
            return self._block_reason
        return None

    def reset(self) -> None:
        """Drop the attempt in progress without a decision: its votes were scored against a gallery that has
        just been replaced (someone enrolled or removed), so they are not comparable with the next frames."""
        self._votes.clear()

    def expire(self, now: float) -> Decision | None:
        """The abandoned attempt, when the face has been gone for `idle_reset_s`; the service calls this on every
        frame (with or without a face), so a stranger who steps away before a decision is still counted."""
        if not self._votes or now - self._last_face <= self.decision.idle_reset_s:
            return None
        votes = list(self._votes)
        self._votes.clear()
        matched = sum(v.match.person is not None for v in votes)
        best = _closest(votes)
        decision = Decision("abandoned", None, min(v.match.distance for v in votes), len(votes), 0.0,
                            f"face left after {len(votes)} frame(s) without a decision ({matched} matched anyone; "
                            f"nearest: {best.match.nearest})", best.match.score)
        if len(votes) < self.decision.votes_needed:
            # Too few frames to have opened the door for anyone: audited, but not a refusal. Counting it let
            # five passers-by glimpsed for a frame each lock the residents out (a review finding).
            return decision
        return self._refused(decision, now)

    def observe(self, match: Match, crop: np.ndarray, now: float) -> Decision | None:
        """Add one frame's match; returns a Decision when an attempt is complete (or was abandoned), else None.

        An abandoned attempt noticed here is returned and this frame starts the next attempt.
        """
        if self.blocked(now):
            return None
        abandoned = self.expire(now)
        self._last_face = now
        self._votes.append(_Vote(match, crop))
        if abandoned is not None:
            return abandoned
        while len(self._votes) > self.decision.window:
            self._votes.popleft()
        counts: dict[str, int] = {}
        for v in self._votes:
            if v.match.person is not None:
                counts[v.match.person] = counts.get(v.match.person, 0) + 1
        winner = max(counts, key=counts.get) if counts else None
        if winner is not None and counts[winner] >= self.decision.votes_needed:
            return self._finish(winner, now)
        if len(self._votes) >= self.decision.window:
            return self._finish(None, now)
        return None

    def _finish(self, person: str | None, now: float) -> Decision:
        votes = list(self._votes)
        self._votes.clear()
        used = [v for v in votes if v.match.person == person] if person else votes
        distance = min(v.match.distance for v in used)
        scores = [v.match.score for v in used if v.match.score is not None]
        score = max(scores) if scores else None
        # Only the frames that matched the person count: a still photo of a resident must not borrow the
        # motion of another face (the attacker's own) seen in the same window.
        moved = motion([v.crop for v in used])
        if person is not None and self.liveness.enabled and moved < self.liveness.min_motion:
            decision = Decision("not_live", person, distance, len(votes), moved,
                                f"aligned face crops changed {moved:.2f} grey levels < {self.liveness.min_motion}: "
                                "still picture?", score)
        elif person is not None:
            self._block(now + self.decision.cooldown_s, "cooldown")
            return Decision("unlock", person, distance, len(votes), moved,
                            f"{len(used)} of {len(votes)} frames matched", score)
        else:
            matched = sum(v.match.person is not None for v in votes)
            decision = Decision("deny", None, distance, len(votes), moved,
                                f"no enrolled person matched in {self.decision.votes_needed} of {len(votes)} "
                                f"frames ({matched} frame(s) matched anyone; nearest: {_closest(votes).match.nearest})",
                                score)
        return self._refused(decision, now)

    def _refused(self, decision: Decision, now: float) -> Decision:
        """Count a refusal; the `max_attempts`-th within `attempt_window_s` starts a lockout."""
        self._denials.append(now)
        while self._denials and now - self._denials[0] > self.decision.attempt_window_s:
            self._denials.popleft()
        if len(self._denials) >= self.decision.max_attempts:
            self._denials.clear()
            self._block(now + self.decision.lockout_s, "lockout")
            decision = replace(decision, reason=decision.reason + f"; {self.decision.max_attempts} refusals "
                               f"within {self.decision.attempt_window_s:.0f} s: locked out for {self.decision.lockout_s:.0f} s")
        return decision

    def _block(self, until: float, reason: str) -> None:
        self._blocked_until = until
        self._block_reason = reason


def _closest(votes: list[_Vote]) -> _Vote:
    """The vote closest to an enrolled person by the rule that decided: best score where frames were scored,
    else smallest distance. None-safe: frames scored against an empty gallery have no score."""
    scored = [v for v in votes if v.match.score is not None]
    if scored:
        return max(scored, key=lambda v: v.match.score)
    return min(votes, key=lambda v: v.match.distance)
