"""Whether the heads' drafts still pay. A tree step costs more than a plain one (on a CPU several token rows go
through the weights, and the heads draft), so it pays only while it emits more tokens than that ratio, its
break-even, measured with the tree at each batch size (TreeChoice.break_even). The heads were trained on some
text; on text unlike it (another language, another kind of task) their drafts are seldom right, and there
every tree step loses. Where the last WINDOW tree steps emitted fewer tokens on average than the break-even,
the heads stop drafting for PAUSE tokens, then try again: acceptance changes along an answer (a code block after
prose). Each pause that follows a failed window doubles, up to MAX_PAUSE: with a fixed pause a third of the
steps were still failing tree steps (SmolLM2 Q4_1, batch 4, everyday prompts: 0.90x plain, 0.94x doubling).
A sequence decoding alone is judged on its own steps. A batch is judged as a whole, on the tokens its tree
steps emitted per sequence: a paused sequence in it would take a plain forward of its own beside the tree's,
so either all its sequences draft or none."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW = 16  # tree steps judged: enough that one unlucky run does not stop the heads
PAUSE = 32  # tokens (a batch: steps) then decoded plainly before the heads draft again
MAX_PAUSE = 512  # the longest pause after failed windows in a row


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

    def pays(self, clock: int, break_even: float) -> bool:
        """Should the heads draft now, at `clock`? No while paused, and no (a pause begins) once a full window
        of tree steps emitted fewer tokens each than break_even."""
        if clock < self.resume_at:
            return False
        if len(self.emitted) < WINDOW:
            return True
        if sum(self.emitted) >= break_even * WINDOW:
            self.pause = PAUSE
            return True
        self.resume_at, self.pause = clock + self.pause, min(2 * self.pause, MAX_PAUSE)
        self.emitted.clear()
        return False
