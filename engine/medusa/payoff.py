"""Whether the heads' drafts still pay. A tree step costs more than a plain one (on a CPU several token rows go
through the weights, and the heads draft), so it pays only while it emits more tokens than that ratio, its
break-even. The engine times its own decode steps (StepClock): plain ones and tree ones, per batch size; until
both have been timed at a batch size, the break-even is the one train-medusa measured with the tree
(TreeChoice.break_even), which can be far off the real one (other prompts, weights or machine load: SmolLM2 Q4_1
decoded 4% slower than plainly at a break-even timed 1.64 when its steps emitted 1.69). The heads were trained on some
text; on text unlike it (another language, another kind of task) their drafts are seldom right, and there
every tree step loses. Where the last WINDOW tree steps emitted fewer tokens on average than the break-even,
the heads stop drafting for PAUSE tokens, then try again: acceptance changes along an answer (a code block after
prose). Each pause that follows a failed window doubles, up to MAX_PAUSE: with a fixed pause a third of the
steps were still failing tree steps (SmolLM2 Q4_1, batch 4, everyday prompts: 0.90x plain, 0.94x doubling).
A sequence decoding alone is judged on its own steps, after the engine's last window (engine.medusa.speculator:
a new sequence starts from it). A batch is judged as a whole, on the tokens its tree
steps emitted per sequence: its break-even is the cost of a step in which all its sequences verify the tree, so
either all its sequences draft or none."""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from statistics import median

WINDOW = 16  # tree steps judged: enough that one unlucky run does not stop the heads
PAUSE = 32  # tokens (a batch: steps) then decoded plainly before the heads draft again
MAX_PAUSE = 512  # the longest pause after failed windows in a row
SAMPLES = 16  # the recent steps a step time is the median of
MIN_SAMPLES = 3  # steps timed before their median counts
PROBE_SOON = 8  # tree steps between plain steps made to be timed, until MIN_SAMPLES were
PROBE_EVERY = 128  # and after


@dataclass
class Payoff:
    """One record: a sequence's (its clock its length), or the batches' (its clock the batch steps, a step's
    tokens the batch's mean per sequence). Invariant: `emitted` holds the tokens emitted by each of the last (at
    most WINDOW) tree steps since the heads last started drafting; they draft again once the clock reaches
    `resume_at`; the next pause lasts `pause`: PAUSE, doubled by each failed window since one paid."""

    emitted: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    resume_at: int = 0
    pause: int = PAUSE

    def record(self, tokens: float) -> None:
        self.emitted.append(tokens)

    def pays(self, clock: int, break_even: float | None) -> bool:
        """Should the heads draft now, at `clock`? No while paused, and no (a pause begins) once a full window
        of tree steps emitted fewer tokens each than break_even (None: not known yet, not judged)."""
        if clock < self.resume_at:
            return False
        if break_even is None or len(self.emitted) < WINDOW:
            return True
        if sum(self.emitted) >= break_even * WINDOW:
            self.pause = PAUSE
            return True
        self.resume_at, self.pause = clock + self.pause, min(2 * self.pause, MAX_PAUSE)
        self.emitted.clear()
        return False


@dataclass
class StepClock:
    """Wall-clock times of the engine's decode steps (those without prefill), per batch size: plain steps (tree
    None) and steps that verify one of the heads' trees. Invariant: times[(batch_size, tree)] holds the last SAMPLES
    times in seconds; since_plain[batch_size] counts the tree steps since a plain one was last timed or asked for."""

    times: dict[tuple[int, object], deque[float]] = field(default_factory=dict)
    since_plain: Counter[int] = field(default_factory=Counter)

    def record(self, batch_size: int, tree: object | None, seconds: float) -> None:
        self.times.setdefault((batch_size, tree), deque(maxlen=SAMPLES)).append(seconds)
        if tree is None:
            self.since_plain[batch_size] = 0
        else:
            self.since_plain[batch_size] += 1

    def ratio(self, batch_size: int, tree: object) -> float | None:
        """A step verifying the tree against a plain one, at this batch size; None until both were timed."""
        plain, tree_steps = self.times.get((batch_size, None), ()), self.times.get((batch_size, tree), ())
        if min(len(plain), len(tree_steps)) < MIN_SAMPLES:
            return None
        return median(tree_steps) / median(plain)

    def wants_plain(self, batch_size: int) -> bool:
        """Should the next step at this batch size be plain, to be timed? While the heads pay they draft at every
        step, and the plain steps' time would be unknown, or stale as the sequences grow; a step made plain costs
        what its drafts would have gained (about 1% of the tokens at PROBE_EVERY). Asking starts the count again: a
        step that then mixes in a prefill is not timed, and drafting goes on."""
        timed = len(self.times.get((batch_size, None), ()))
        if self.since_plain[batch_size] < (PROBE_SOON if timed < MIN_SAMPLES else PROBE_EVERY):
            return False
        self.since_plain[batch_size] = 0
        return True
