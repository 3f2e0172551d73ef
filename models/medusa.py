"""Medusa heads: the nn.Module over the base model's final hidden state, and its files in the published
Medusa format (config.json + medusa_lm_head.safetensors), plus our optional draft vocabulary.

Head k (from 0) at hidden state h_i predicts token i+2+k; the base model's own logits there predict i+1.
Two kinds: Medusa heads read h_i alone; Hydra heads (sequential, Ankner et al. 2024) also read the tokens
before the one they predict, along the tree path (see MedusaHeads). Training (engine.training.medusa) and
drafting (engine.medusa) both use this module."""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, islice
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.kernels.decode import MAX_ROWS, DecodeKernels
from models.layers import Linear
from models.quant import QType, quantize, tiled_linear

WEIGHTS_FILE = "medusa_lm_head.safetensors"
# Our addition to the published format: the token ids the heads propose from (see MedusaHeads.draft_vocab)
DRAFT_VOCAB_FILE = "draft_vocab.safetensors"
_KEY = re.compile(r"(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)|(\d+)\.input\.(weight|bias)")
HEAD_KINDS = ("medusa", "hydra")  # config.json's head_kind (absent: medusa, the published format)


@dataclass
class MedusaConfig:
    """Shape of a set of heads; hidden_size and vocab_size are always the base model's."""

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    own_lm_head: bool  # "v1": each head has its own vocab projection; "v2": the heads share the base lm_head
    sequential: bool = False  # Hydra heads: each also reads the tokens before the one it predicts


class ResBlock(nn.Module):
    """x + SiLU(W x + b): the published Medusa block (and its state-dict key, `linear`)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # a fresh block is the identity, so a fresh v2 head starts as the lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def _zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


@dataclass
class DraftWeights:
    """What drafting reads every step, gathered once (MedusaHeads.draft_weights): each head's blocks' weights (as
    the CPU kernels take them: float, or Q8_0 blocks) and biases (fp32), and the vocabulary projections (one
    shared, or one per head)."""

    weights: list[list[torch.Tensor]]  # [head][block]
    biases: list[list[torch.Tensor]]  # [head][block]
    projections: list[torch.Tensor]
    projection_qtype: int = 0  # a quantized base lm_head's ggml type (models.quant): its rows stay in their blocks
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # Hydra: [head] (weight, bias)
    weights_qtype: int = 0  # the ggml type of the blocks' and inputs' weights (0: float)


class MedusaHeads(nn.Module):
    """K heads over the base model's final-normed hidden state; head h is blocks heads[h][0..N-1], then
    (v1) its own projection heads[h][N]. Invariant: `heads.state_dict()` keys are the published format's,
    `{h}.{j}.linear.weight|bias` and `{h}.{N}.weight`.

    Sequential (Hydra) heads also read the tokens before the one they predict, through an input layer
    inputs[h] (file keys `{h}.input.weight|bias`): at hidden state h_i, with e_j the base model's embedding
    of token j, head h's blocks read x_h = s_h + inputs[h]([s_h, e_{i+1+h}]), where s_0 = h_i and
    s_h = x_{h-1}. Token i+1 is the base model's own (a tree's root); the later ones are the drafts along
    the path, so a tree is drafted level by level: each node runs the head of its depth on its own state
    and token (draft_level). No attention: the heads need no cache. A fresh input layer is zero: the head
    starts as a Medusa head.

    `draft_vocab` (optional, from training): the ids of the tokens the heads propose, the commonest of
    their training text. Projecting onto those alone cuts the cost of drafting, which reads the whole
    vocabulary projection every step, for few lost acceptances: a rare token is seldom a right draft."""

    kernels: DecodeKernels | None = None  # set at load time (models.kernels.decode.set_decode_kernels)

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = config
        h, v = config.hidden_size, config.vocab_size
        self.heads = nn.ModuleList(
            nn.ModuleList([*(ResBlock(h) for _ in range(config.num_layers)),
                           *([Linear(h, v, bias=False)] if config.own_lm_head else [])])
            for _ in range(config.num_heads))
        self.inputs = nn.ModuleList(_zero(Linear(2 * h, h)) for _ in range(config.num_heads)) \
            if config.sequential else None
        self.register_buffer("draft_vocab", None, persistent=False)  # int64 [n] token ids, or None: all

    @property
    def num_draft_tokens(self) -> int:
        return self.config.vocab_size if self.draft_vocab is None else len(self.draft_vocab)

    @property
    def kind(self) -> str:
        return "hydra" if self.config.sequential else "medusa"

    def file_state(self) -> dict[str, torch.Tensor]:
        """The tensors of the heads' file, by their keys there (see the class)."""
        state = dict(self.heads.state_dict())
        if self.inputs is not None:
            state |= {f"{h}.input.{name}": t for h, layer in enumerate(self.inputs)
                      for name, t in layer.state_dict().items()}
        return state

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.heads.load_state_dict({k: t for k, t in tensors.items() if ".input." not in k})
        if self.inputs is not None:
            self.inputs.load_state_dict({k.replace(".input.", "."): t for k, t in tensors.items() if ".input." in k})

    def _blocks(self, x: torch.Tensor, head: int) -> torch.Tensor:
        for block in islice(self.heads[head], self.config.num_layers):
            x = block(x)
        return x

    def next_input(self, state: torch.Tensor, embedding: torch.Tensor, head: int) -> torch.Tensor:
        """Hydra: what head `head`'s blocks read, from the state before it (the hidden state for head 0) and the
        embedding of the token before the one it predicts; also the state the next head starts from."""
        return state + self.inputs[head](torch.cat([state, embedding], dim=-1))

    def _states(self, hidden: torch.Tensor, heads: list[int], embeddings: torch.Tensor | None) -> list[torch.Tensor]:
        if self.config.sequential and embeddings is None:
            raise ValueError("Hydra heads read the tokens before the ones they predict: give their embeddings")
        states, x = [], hidden
        for h in heads:
            if self.config.sequential:
                x = self.next_input(x, embeddings[h], h)
            states.append(self._blocks(x, h))
        return states

    def forward(self, hidden: torch.Tensor, base_lm_head: Callable[[torch.Tensor], torch.Tensor],
                num_heads: int | None = None, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [..., hidden_size] -> logits of the first num_heads heads over the whole vocabulary,
        [num_heads, ..., vocab]. Hydra heads also take embeddings [num_heads, ..., hidden_size]: head k's of
        token i+1+k (the tokens before the ones they predict: the base model's next token, then the right ones)."""
        indices = range(min(num_heads or self.config.num_heads, self.config.num_heads))
        heads = [self.heads[h] for h in indices]
        states = self._states(hidden, list(indices), embeddings)
        if self.config.own_lm_head:
            return torch.stack([head[-1](x) for head, x in zip(heads, states)])
        return base_lm_head(torch.stack(states))  # one projection for all heads

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def draft_weights(self, base_lm_head: nn.Linear) -> DraftWeights:
        """What top_k reads, gathered once: the vocabulary projections are each head's own (v1) or the one
        shared base lm_head (v2), restricted to the draft vocabulary's rows: a quantized lm_head's in its blocks;
        a float one in the heads' dtype, or in Q8_0 blocks for the CPU kernels (set_decode_kernels)."""
        blocks = [[block.linear for block in islice(head, self.config.num_layers)] for head in self.heads]
        projections = [head[-1].weight for head in self.heads] if self.config.own_lm_head else [base_lm_head.weight]
        if self.draft_vocab is not None:
            projections = [w[self.draft_vocab] for w in projections]
        qtype = 0 if self.config.own_lm_head else int(getattr(base_lm_head, "qtype", 0))
        weights = [[b.kernel_weight for b in head] for head in blocks]
        inputs = [(layer.kernel_weight, layer.bias.float()) for layer in self.inputs or []]
        weights_qtype = 0
        if self.kernels is not None:
            # on a CPU drafting streams its weights from memory at every level of the tree (the model's forward
            # evicts them): in Q8_0 half a bf16 one's bytes, for the same top-k but a rare near-tie. The projection,
            # the largest (SmolLM2 BF16, a 9-node tree: 1.11 -> 0.80 ms a step's drafting, 2.46 tokens per step
            # before and after), and the heads' own layers (that tree's 4 levels, weights out of cache: 0.93 -> 0.79 ms)
            if not qtype:
                projections, qtype = [quantize(w, QType.Q8_0).data for w in projections], int(QType.Q8_0)
            layers = [*(b for head in blocks for b in head), *(self.inputs or [])]
            if all(layer.weight.shape[1] % 32 == 0 for layer in layers):  # whole Q8_0 blocks
                weights_qtype = int(QType.Q8_0)
                weights = [[self._draft_q8(b.weight) for b in head] for head in blocks]
                inputs = [(self._draft_q8(layer.weight), bias) for layer, (_, bias) in zip(self.inputs or [], inputs)]
        return DraftWeights(weights, [[b.bias.float() for b in head] for head in blocks],
                            [(w if qtype else w.to(self.dtype)).contiguous() for w in projections], qtype, inputs,
                            weights_qtype)

    def _draft_q8(self, weight: torch.Tensor) -> torch.Tensor:
        """A head layer's weight in Q8_0 blocks, laid out for the CPU kernels where that applies."""
        blocks = quantize(weight.detach(), QType.Q8_0).data
        packed = self.kernels.ops.repack(blocks, int(QType.Q8_0), weight.shape[1])
        return blocks if packed is None else packed

    def top_k(self, hidden: torch.Tensor, draft: DraftWeights, num_heads: int, k: int) -> torch.Tensor:
        """Medusa: the k likeliest draft-vocabulary tokens of each of the first num_heads heads at hidden
        [B, hidden_size] -> token ids [num_heads, B, k]; draft: from draft_weights. On a CPU at decode sizes
        one kernel call does it all (models.kernels.decode)."""
        if self.config.sequential:
            raise ValueError("Hydra heads draft level by level (draft_level)")
        return self._top_k(hidden, draft, range(num_heads), k)[0]

    def top_k_logprobs(self, hidden: torch.Tensor, draft: DraftWeights, num_heads: int,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """top_k, and the tokens' log-probabilities under each head's softmax over the draft vocabulary
        [num_heads, B, k]."""
        if self.config.sequential:
            raise ValueError("Hydra heads draft level by level (draft_level)")
        return self._top_k(hidden, draft, range(num_heads), k, logprobs=True)

    def draft_level(self, states: torch.Tensor, embeddings: torch.Tensor, head: int, draft: DraftWeights,
                    k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hydra: head `head` at R tree nodes, from each node's state [R, hidden_size] (the hidden state at the
        root) and its token's embedding [R, hidden_size] -> (the states their children start from [R, hidden_size],
        the k likeliest draft-vocabulary tokens of each node's children [R, k], their log-probabilities under the
        head's softmax over the draft vocabulary [R, k]). On a CPU at decode sizes one kernel call does it all
        (models.kernels.decode)."""
        if self.kernels is not None and len(states) <= MAX_ROWS:
            weight, bias = draft.inputs[head]
            projection = draft.projections[0 if len(draft.projections) == 1 else head]
            x, top, logprobs = self.kernels.ops.hydra_level(states, embeddings, weight, bias, draft.weights[head],
                                                            draft.biases[head], projection, k,
                                                            draft.projection_qtype, draft.weights_qtype)
            return x, self._token_ids(top), logprobs
        x = self.next_input(states.to(self.dtype), embeddings.to(self.dtype), head)
        top, logprobs = self._top_k(x, draft, range(head, head + 1), k, logprobs=True)
        return x, top[0], logprobs[0]

    def _top_k(self, hidden: torch.Tensor, draft: DraftWeights, heads: range, k: int,
               logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The k likeliest draft-vocabulary tokens of these heads' blocks and projections at hidden [B, hidden_size]
        -> ([len(heads), B, k], with `logprobs` their log-probabilities under each head's softmax, else None)."""
        shared = len(draft.projections) == 1
        projections = draft.projections if shared else draft.projections[heads.start:heads.stop]
        if self.kernels is not None and len(heads) * len(hidden) <= MAX_ROWS:
            args = (hidden, [*chain.from_iterable(draft.weights[heads.start:heads.stop])],
                    [*chain.from_iterable(draft.biases[heads.start:heads.stop])], len(heads), projections, k,
                    draft.projection_qtype, draft.weights_qtype)
            top, values = self.kernels.ops.medusa_top_k_logprobs(*args) if logprobs else \
                (self.kernels.ops.medusa_top_k(*args), None)
            return self._token_ids(top), values
        x = hidden.to(self.dtype)
        states = torch.stack([self._blocks(x, h) for h in heads])  # [len(heads), B, hidden]
        qtype = draft.projection_qtype
        linear = partial(tiled_linear, qtype=QType(qtype)) if qtype else F.linear
        if shared:
            logits = linear(states, projections[0])
        else:
            logits = torch.stack([linear(x, w) for x, w in zip(states, projections)])
        if not logprobs:
            return self._token_ids(logits.topk(k, dim=-1).indices), None
        top = logits.float().log_softmax(dim=-1).topk(k, dim=-1)
        return self._token_ids(top.indices), top.values

    def _token_ids(self, top: torch.Tensor) -> torch.Tensor:
        """Token ids of draft-vocabulary indices."""
        return top if self.draft_vocab is None else self.draft_vocab[top]


def head_kind(folder: str | Path) -> str:
    """The kind of heads a folder holds, from its config.json (medusa where it says none, or has none: loading
    the heads says what is missing)."""
    config_file = Path(folder) / "config.json"
    return json.loads(config_file.read_text()).get("head_kind", "medusa") if config_file.is_file() else "medusa"


def load_medusa_heads(folder: str | Path, hidden_size: int, vocab_size: int,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> MedusaHeads:
    """Read a published Medusa folder (config.json + medusa_lm_head.safetensors) for a base model with
    this hidden size and vocabulary. Every tensor must be expected and present, with the expected shape."""
    folder = Path(folder)
    config_file, weights_file = folder / "config.json", folder / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{folder} is not a Medusa heads folder: {f.name} is missing")
    config = json.loads(config_file.read_text())
    if "medusa_num_layers" not in config:
        raise ValueError(f"{config_file} has no medusa_num_layers")
    tensors = load_file(weights_file)
    parsed = {key: _KEY.fullmatch(key) for key in tensors}
    unknown = sorted(key for key, m in parsed.items() if m is None)
    if not tensors:
        raise ValueError(f"{weights_file} holds no tensors")
    if unknown:
        raise ValueError(f"{weights_file}: unexpected tensors {unknown} (expected "
                         "'{head}.{block}.linear.weight|bias', '{head}.{num_layers}.weight' and, for Hydra heads, "
                         "'{head}.input.weight|bias')")
    num_heads = 1 + max(int(m[1] or m[4]) for m in parsed.values())
    if num_heads != config.get("medusa_num_heads", num_heads):
        warnings.warn(f"{config_file} says medusa_num_heads={config['medusa_num_heads']}, but the weights hold "
                      f"{num_heads} heads; using {num_heads}", stacklevel=2)
    own_lm_head = any(m[3] == "weight" for m in parsed.values())
    kind = head_kind(folder)
    if kind not in HEAD_KINDS:
        raise ValueError(f"{config_file}: head_kind must be one of {', '.join(HEAD_KINDS)}, not {kind!r}")
    heads = MedusaHeads(MedusaConfig(num_heads, int(config["medusa_num_layers"]), hidden_size, vocab_size, own_lm_head,
                                     sequential=kind == "hydra"))
    expected = heads.file_state()
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match {num_heads} {kind} heads of {heads.config.num_layers} "
                         f"blocks ({'v1' if own_lm_head else 'v2'}): missing {missing}, unexpected {unexpected}")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{weights_file}: {key} has shape {list(tensor.shape)}, but a base model with hidden "
                             f"size {hidden_size} and vocabulary {vocab_size} needs {list(expected[key].shape)}")
    heads.load_file_state(tensors)
    if (folder / DRAFT_VOCAB_FILE).is_file():
        heads.draft_vocab = _read_draft_vocab(folder / DRAFT_VOCAB_FILE, vocab_size)
    return heads.to(device=device, dtype=dtype).eval()


def _read_draft_vocab(path: Path, vocab_size: int) -> torch.Tensor:
    tensors = load_file(path)
    ids = tensors.get("token_ids")
    if set(tensors) != {"token_ids"} or ids.dim() != 1 or ids.dtype != torch.int64 or len(ids) == 0:
        raise ValueError(f"{path} must hold one tensor, token_ids: a non-empty int64 vector of token ids")
    if ids.min() < 0 or ids.max() >= vocab_size or len(ids.unique()) != len(ids):
        raise ValueError(f"{path}: token_ids must be distinct ids of the base model's {vocab_size}-token vocabulary")
    return ids


def save_medusa_heads(heads: MedusaHeads, folder: str | Path, base_model: str | None = None) -> None:
    """Write `heads` in the published format (readable by load_medusa_heads and the reference code)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = heads.config
    config = {"medusa_num_heads": c.num_heads, "medusa_num_layers": c.num_layers, "hidden_size": c.hidden_size,
              "vocab_size": c.vocab_size, "base_model_name_or_path": base_model}
    if c.sequential:  # (the published format has Medusa heads only)
        config["head_kind"] = "hydra"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in heads.file_state().items()}, folder / WEIGHTS_FILE)
    if heads.draft_vocab is not None:
        save_file({"token_ids": heads.draft_vocab.cpu().contiguous()}, folder / DRAFT_VOCAB_FILE)
    else:  # an older draft vocabulary in the folder belongs to other heads
        (folder / DRAFT_VOCAB_FILE).unlink(missing_ok=True)
