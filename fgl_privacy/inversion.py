"""Embedding inversion by the server: recover a silo's prompt from its text embedding.

SD's conditioning is the CLIP text transformer's last hidden state, and that transformer is
causal: the row at position i depends only on the tokens up to i. The server holds the very
encoder the silos use (the probe check proves it), so it can recover a prompt token by token:
for position i, try every token of the vocabulary after the prefix recovered so far, and keep
the one whose encoding at i is nearest to the received row. Each step is one batched forward
pass over the vocabulary; the prompt ends at the end-of-text token. Causality also means the
prefix's keys and values in every layer are the same for every candidate: they are computed
once per recovered token and cached, so each step runs one token per candidate through the
layers, not the whole prefix.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Recovery:
    """One inverted embedding: the true and recovered token ids (from the start token to the
    end token), and how far each recovered row was from the received one."""

    true_ids: list[int]
    recovered_ids: list[int]
    distances: list[float]

    @property
    def token_accuracy(self) -> float:
        """The share of the true prompt's tokens recovered at their position."""
        pairs = zip(self.true_ids[1:], self.recovered_ids[1:], strict=False)
        return sum(a == b for a, b in pairs) / max(len(self.true_ids) - 1, 1)

    @property
    def exact(self) -> bool:
        return self.recovered_ids == self.true_ids


class PromptInverter:
    """Greedy token-by-token inversion with a `CLIPTextModel` and its tokenizer. `penultimate`:
    the rows are the encoder's penultimate hidden states, before its last layer and final norm
    (SDXL conditions on those)."""

    def __init__(  # type: ignore[no-untyped-def]
        self, tokenizer, model, device: torch.device, batch: int = 16384, penultimate: bool = False
    ) -> None:
        self.tokenizer, self.device, self.batch = tokenizer, device, batch
        self.model = copy.deepcopy(model).float().to(device).eval()
        self.penultimate = penultimate
        self.layers = list(self.model.encoder.layers)[: -1 if penultimate else None]
        self.vocab = torch.arange(int(self.model.config.vocab_size), device=device)
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's ids from the start token to the end token, as the encoder sees them."""
        return list(self.tokenizer(prompt, truncation=True, max_length=77).input_ids)

    def step(
        self, tokens: torch.Tensor, position: int, cache: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each of `tokens` (B,) at `position` after the cached prefix: its last hidden state
        (B, D) and its keys and values in every layer (to append to the cache)."""
        emb = self.model.embeddings
        x = emb.token_embedding(tokens) + emb.position_embedding.weight[position]
        new = []
        for layer, (keys, values) in zip(self.layers, cache, strict=True):
            attn = layer.self_attn
            h = layer.layer_norm1(x)
            shape = (len(tokens), attn.num_heads, 1, attn.head_dim)
            q, k, v = (proj(h).view(shape) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            # the prefix (shared by all candidates) and the candidate itself
            scores = torch.cat([q @ keys.transpose(-1, -2), (q * k).sum(-1, keepdim=True)], -1)
            weights = (scores * attn.scale).softmax(-1)
            mixed = weights[..., :-1] @ values + weights[..., -1:] * v
            x = x + attn.out_proj(mixed.reshape(len(tokens), -1))
            x = x + layer.mlp(layer.layer_norm2(x))
            new.append((k, v))
        return (x if self.penultimate else self.model.final_layer_norm(x)), new

    @torch.no_grad()
    def invert(self, rows: torch.Tensor, max_tokens: int = 77) -> tuple[list[int], list[float]]:
        """(77, D) received rows -> recovered ids (start token first) and each step's distance."""
        rows = rows.to(self.device, torch.float32)
        first = self.layers[0].self_attn
        empty = torch.empty(1, first.num_heads, 0, first.head_dim, device=self.device)
        cache = [(empty, empty) for _ in self.layers]
        _, kv = self.step(torch.tensor([self.bos], device=self.device), 0, cache)
        cache = [(k, v) for k, v in kv]
        ids, distances = [self.bos], []
        while len(ids) < min(max_tokens, rows.shape[0]):
            position = len(ids)
            best, best_distance = -1, float("inf")
            for start in range(0, len(self.vocab), self.batch):
                candidates = self.vocab[start : start + self.batch]
                hidden, _ = self.step(candidates, position, cache)
                distance = (hidden - rows[position]).pow(2).sum(-1)
                value, index = distance.min(0)
                if float(value) < best_distance:
                    best, best_distance = int(candidates[index]), float(value)
            ids.append(best)
            distances.append(best_distance**0.5)
            if best == self.eos:
                break
            _, kv = self.step(torch.tensor([best], device=self.device), position, cache)
            cache = [
                (torch.cat([k0, k], 2), torch.cat([v0, v], 2))
                for (k0, v0), (k, v) in zip(cache, kv, strict=True)
            ]
        return ids, distances

    def recover(self, prompt: str, rows: torch.Tensor) -> Recovery:
        """Invert `rows` (the encoding of `prompt` as a silo sent it) and compare. The search
        stops at the end token, or one token past the true prompt's length (a cap on the cost,
        not a hint: a longer guess is wrong either way)."""
        true_ids = self.token_ids(prompt)
        recovered, distances = self.invert(rows, max_tokens=len(true_ids) + 1)
        return Recovery(true_ids, recovered, distances)

    def decode(self, ids: list[int]) -> str:
        """The text of recovered ids (CLIP's tokens end words, so punctuation is rejoined)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return re.sub(r" ([,.;:!?])", r"\1", text).strip()
