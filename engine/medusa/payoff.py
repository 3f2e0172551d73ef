"""Whether the heads' drafts still pay for one sequence. A tree step costs more than a plain one (on a CPU
several token rows go through the weights, and the heads draft), so it pays only while it emits more tokens
than that ratio, its break-even, measured with the tree (TreeChoice.break_even). The heads were trained on
some text; on text unlike it (another language, another kind of task) their drafts are seldom right, and
there every tree step loses. A sequence whose last WINDOW tree steps emitted fewer tokens on average than the
break-even decodes plainly for its next PAUSE tokens, then the heads try again: acceptance changes along an
answer (a code block after prose). Only a sequence decoding alone is judged: in a batch, a paused sequence would
take a plain forward of its own beside the tree's."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW = 16  # heads' tree steps a sequence is judged on: enough that one unlucky run does not stop it
PAUSE = 32  # tokens a sequence then decodes plainly before the heads draft for it again


@dataclass
class Payoff:
    """One sequence's record. Invariant: `emitted` holds the tokens emitted by each of its last (at most
    WINDOW) heads' tree steps since the heads last started drafting for it; they draft for it again once the
    sequence is `resume_at` tokens long."""

    emitted: deque[int] = field(default_factory=lambda: deque(maxlen=WINDOW))
    resume_at: int = 0

    def record(self, tokens: int) -> None:
        self.emitted.append(tokens)

    def pays(self, length: int, break_even: float) -> bool:
        """Should the heads draft for the sequence, now `length` tokens long? No while it is paused, and no (a
        pause begins) once a full window of its tree steps emitted fewer tokens each than break_even."""
        if length < self.resume_at:
            return False
        if len(self.emitted) == WINDOW and sum(self.emitted) < break_even * WINDOW:
            self.resume_at = length + PAUSE
            self.emitted.clear()
            return False
        return True
