"""Where the language model looks while it answers: its attention from each generated token to the prompt's parts,
and the part on the visual tokens carried back through the connector to frames and patches (`llm_attention`).

The answer is generated as usual (sdpa); then one teacher-forced pass over prompt + answer runs the LLM with eager
attention, and a hook on each attention layer keeps only the rows of the answer's positions, reduced at once to the
visual tokens and three part totals (never layers x heads x sequence x sequence). The row that writes answer token
k is the position before it (the prompt's last token for k = 0), the same numbers generation computed.

From visual token to frame and patch the connector answers itself (`ConnectorModule.token_sources`: its query
attention rolled out through its layers, LLaVA-Mini's compression attention (its pre-fusion layers, which also mix
the video into the prompt's text embeddings, are not followed: that share counts as text), the pooling bins, ToMe's
merge sources, top-k's kept positions, the MLP's identity): relevance over the flat input tokens = relevance over the
visual tokens @ sources, summed per frame, drawn per patch. A closing end-of-sequence token is not traced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dataclasses import replace

from ..errors import VidlmmError
from .attention import _prepared, frame_aspect
from .jsonable import to_jsonable
from .zeroing import _decode

if TYPE_CHECKING:
    from ..pipeline import VideoLMM

PARTS = ("text", "visual", "answer")  # the prompt's text (system, instruction), the video, earlier answer tokens


@dataclass
class LLMAttention:
    """One answer's LLM attention, traced to the video.

    tokens / token_ids: the answer (A tokens). shares [A, L, H, 3]: per answer token, LLM layer and head, the
    attention mass on each of PARTS (a row of the LLM's attention sums to 1 over them). visual [A, L, H, Q]: the
    attention on each visual token. sources [Q, N]: each visual token's weights over the flat frame-major input tokens
    (rows sum to 1; None when traced with trace_sources=False). layout: where each input token sits (frame, row,
    col). frames [T, S, S, 3] uint8: what the tower saw. teacher_forced_reproduces_answer: the pass's argmax gives
    the generated ids (a numerical check).
    """

    question: str
    answer: str
    tokens: list[str]
    token_ids: list[int]
    shares: np.ndarray
    visual: np.ndarray
    sources: np.ndarray
    layout: object
    frames: np.ndarray
    frame_indices: list[int]
    timestamps: list[float]
    connector_type: str
    frame_aspect: float = 1.0
    teacher_forced_reproduces_answer: bool = True
    heads: int = 0  # the LLM's heads when `visual` and `shares` were collapsed over them (`collapse_heads`)

    @property
    def num_layers(self) -> int:
        return int(self.shares.shape[1])

    @property
    def num_frames(self) -> int:
        return int(self.layout.num_frames)

    def collapse_heads(self) -> "LLMAttention":
        """A copy holding the heads' sum (visual) and mean (shares) only: every relevance and share over all heads is
        unchanged, per-head views are gone (an H-th of the memory: what the app keeps per session)."""
        from dataclasses import replace

        return replace(self, visual=self.visual.sum(axis=2, keepdims=True),
                       shares=self.shares.mean(axis=2, keepdims=True), heads=self.heads or self.shares.shape[2])

    def visual_share(self, head: int | None = None) -> np.ndarray:
        """[A, L] attention mass on the visual tokens per answer token and layer (mean over heads, or one head)."""
        part = self.shares[..., PARTS.index("visual")]
        return part.mean(axis=2) if head is None else part[:, :, head]

    def token_relevance(self, token: int | None = None, layer: int | None = None,
                        head: int | None = None) -> np.ndarray:
        """[Q] relevance over the visual tokens, summing to 1: the attention mass on each, summed over the layers
        (or one `layer`) and heads (or one `head`), for one answer token or the whole answer (None)."""
        v = self.visual if token is None else self.visual[[token]]
        v = v if layer is None else v[:, [layer]]
        v = v if head is None else v[:, :, [head]]
        mass = v.sum(axis=(0, 1, 2)).astype(np.float64)
        total = mass.sum()
        return mass / total if total > 0 else np.full_like(mass, 1.0 / max(mass.size, 1))

    def input_relevance(self, **which) -> np.ndarray:
        """[N] relevance over the flat input tokens (frame-major patches), summing to 1."""
        return self.token_relevance(**which) @ self.sources

    def frame_relevance(self, **which) -> np.ndarray:
        """[T] relevance per frame, summing to 1."""
        per_token = self.input_relevance(**which)
        return per_token.reshape(self.num_frames, -1).sum(axis=1)

    def patch_relevance(self, **which) -> np.ndarray:
        """[T, rows, cols] relevance per patch cell (NaN where a cell has no token), summing to 1."""
        import torch

        return self.layout.to_grid(torch.from_numpy(self.input_relevance(**which))).numpy()

    def to_json(self) -> dict:
        """The answer's tokens, each with its visual share per layer, frame relevance and part shares; the same for
        the whole answer. Patch relevance is an array per token: `patch_arrays()`."""
        share = self.visual_share()
        per_token = [{"index": k, "text": text, "token_id": int(tid), "visual_share": share[k].tolist(),
                      "parts": dict(zip(PARTS, self.shares[k].mean(axis=(0, 1)).tolist())),
                      "frame_relevance": self.frame_relevance(token=k).tolist()}
                     for k, (text, tid) in enumerate(zip(self.tokens, self.token_ids))]
        return to_jsonable({
            "question": self.question, "answer": self.answer, "connector_type": self.connector_type,
            "frames": self.num_frames, "frame_indices": self.frame_indices, "timestamps": self.timestamps,
            "grid": list(self.layout.grid), "visual_tokens": int(self.visual.shape[-1]),
            "llm_layers": self.num_layers, "llm_heads": int(self.heads or self.shares.shape[2]),
            "teacher_forced_reproduces_answer": self.teacher_forced_reproduces_answer,
            "answer_visual_share": share.mean(axis=0).tolist(),
            "answer_frame_relevance": self.frame_relevance().tolist(), "tokens": per_token})

    def patch_arrays(self) -> dict[str, np.ndarray]:
        """{"answer": [T, rows, cols], "tokens": [A, T, rows, cols]} patch relevance, float32."""
        return {"answer": self.patch_relevance().astype(np.float32),
                "tokens": np.stack([self.patch_relevance(token=k) for k in range(len(self.tokens))]
                                   ).astype(np.float32)}


def analysis_bytes(layers: int, heads: int, visual_tokens: int, text_tokens: int, answer_tokens: int,
                   input_tokens: int, dtype_bytes: int = 4) -> dict[str, int]:
    """What `llm_attention` holds beyond an ordinary answer, by the formula: `kept`, the reduced attention it returns
    (A x L x H x (Q + 3) float32); `sources`, the connector's map of its Q tokens over the N = T x P input tokens
    (float32); `eager_layer`, one layer's eager attention of the teacher-forced pass (H x S x S in float32 for the
    softmax and once more in the model's dtype), alive one layer at a time; `total`, their sum. S = text + Q + A."""
    seq = text_tokens + visual_tokens + answer_tokens
    out = {"kept": answer_tokens * layers * heads * (visual_tokens + len(PARTS)) * 4,
           "sources": visual_tokens * input_tokens * 4, "eager_layer": heads * seq * seq * (4 + dtype_bytes)}
    return {**out, "total": sum(out.values()), "sequence": seq}


def _check_fits(need: int, device) -> None:
    """One sentence, before the pass, when what the analysis holds cannot fit the device's free memory."""
    from ..memory import free_memory_bytes, gigabytes

    free = free_memory_bytes(device)
    if free is not None and need > free:
        raise VidlmmError(f"Tracing this answer needs about {gigabytes(need)} beyond answering and "
                          f"{gigabytes(free)} is free; use fewer frames or a shorter answer.")


class _Recorder:
    """Forward hooks on the LLM's attention layers keeping, per layer, the answer rows' attention reduced to the
    visual tokens and the part totals, as each layer produces it."""

    def __init__(self, rows: slice, visual: slice, answer_start: int):
        self.rows, self.visual_cols, self.answer_start = rows, visual, answer_start
        self.visual, self.shares = [], []

    def __call__(self, module, args, output):
        import torch

        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise VidlmmError("The language model returned no attention weights; it must run with eager attention.")
        rows = weights[0, :, self.rows].float()  # [H, A, S]
        visual = rows[..., self.visual_cols]
        vis = visual.sum(-1)
        answer = rows[..., self.answer_start:].sum(-1)
        total = rows.sum(-1)
        self.visual.append(visual.transpose(0, 1).cpu())  # [A, H, Q]
        self.shares.append(torch.stack([total - vis - answer, vis, answer]).permute(2, 1, 0).cpu())  # [A, H, 3]


def llm_attention(lmm: "VideoLMM", video, question: str, *, sampling=None, max_new_tokens: int = 32,
                  answer_ids: list[int] | None = None, trace_sources: bool = True) -> LLMAttention:
    """The LLM's attention while it answers `question` about `video` (a path or PreparedVideo), traced to frames
    and patches through the connector. answer_ids: score this answer instead of generating one (greedy).
    trace_sources=False: the attention on the visual tokens only (`token_relevance`, the knockout's ranking); the
    connector's map to the patches is neither computed nor held, and the frame and patch views are unavailable."""
    import torch

    from ..conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from ..pipeline import GenerationSettings

    model = lmm.model
    prepared = _prepared(lmm, video, sampling)
    if answer_ids is None:
        answer_ids = list(lmm.ask(prepared, question, generation=GenerationSettings(
            max_new_tokens=max_new_tokens)).token_ids)
    answer_ids = list(answer_ids)
    while answer_ids and answer_ids[-1] in set(model.tokenizer.all_special_ids):
        answer_ids.pop()  # the closing end-of-sequence token is no word of the answer
    if not answer_ids:
        raise VidlmmError("The answer is empty: there is no generated word to trace.")
    prompt = lmm.prompt_ids(question)
    layout = model.token_layout(prepared.num_frames)
    q = model.num_visual_tokens(prepared.num_frames)
    cfg = model.language_model.config
    need = analysis_bytes(cfg.num_hidden_layers, cfg.num_attention_heads, q, len(prompt) - 1, len(answer_ids),
                          layout.num_frames * layout.tokens_per_frame if trace_sources else 0,
                          torch.finfo(model.dtype).bits // 8)
    _check_fits(need["total"], model.device)
    out = lmm.visual_tokens(prepared, output_attentions=trace_sources)
    sources = model.connector.token_sources(out, layout).float().cpu().numpy() if trace_sources else None
    out = replace(out, attentions=None)  # the connector's maps are not needed past here
    slot, q = prompt.index(IMAGE_TOKEN_INDEX), int(out.tokens.shape[1])
    prompt_len = len(prompt) - 1 + q  # the spliced prompt
    labels = [IGNORE_INDEX] * len(prompt) + list(answer_ids)  # answer tokens keep their raw embeddings, as generated
    recorder = _Recorder(rows=slice(prompt_len - 1, prompt_len - 1 + len(answer_ids)), visual=slice(slot, slot + q),
                         answer_start=prompt_len)
    lm = model.language_model
    layers = [m for name, m in lm.named_modules() if name.endswith("self_attn")]
    before = lm.config._attn_implementation
    with torch.no_grad(), lmm.exclusive():
        embeds, mask, _ = model.build_inputs([prompt + list(answer_ids)], [out], [labels])
        if embeds.shape[1] != prompt_len + len(answer_ids):
            raise VidlmmError("The prompt and answer are longer than the model's context; use fewer frames.")
        hooks = [layer.register_forward_hook(recorder) for layer in layers]
        try:
            lm.set_attn_implementation("eager")
            logits = model(embeds, mask, logits_to_keep=len(answer_ids) + 1).logits[0, :-1]
        finally:
            lm.set_attn_implementation(before)
            for hook in hooks:
                hook.remove()
    reproduces = logits.argmax(-1).tolist() == list(answer_ids)
    clip = prepared.clip
    tokenizer = model.tokenizer
    return LLMAttention(
        question=question, answer=_decode(lmm, answer_ids), tokens=[tokenizer.decode([t]) for t in answer_ids],
        token_ids=list(answer_ids), shares=torch.stack(recorder.shares, dim=1).numpy(),
        visual=torch.stack(recorder.visual, dim=1).numpy(), sources=sources, layout=layout,
        frames=clip.sampled_frames(), frame_indices=[int(i) for i in clip.indices],
        timestamps=[float(x) for x in clip.timestamps], connector_type=model.connector.registry_name,
        frame_aspect=frame_aspect(model.image_processor, clip), teacher_forced_reproduces_answer=reproduces)


def visual_share_on_set(lmm: "VideoLMM", items, *, style: str = "mvbench", max_new_tokens: int = 16,
                        progress=None) -> dict:
    """The layer-wise share of the LLM's attention on the visual tokens over a multiple-choice set (the analysis of
    FastV and LLaVA-Mini): for each question, its answer to the benchmark's prompt, the mean over the answer's
    tokens. Each video is read once for all its questions; one that cannot be read is listed.

    Returns {"visual_share": [n, L], "parts": [n, 3] (PARTS, heads and layers averaged), "ids": [n], "missing"}."""
    from ..errors import VideoReadError
    from ..evaluate import build_mc_question, group_reads, missing_entry

    shares, parts, ids, missing = [], [], [], []
    done = 0
    for (video, frames), indices in group_reads(items, getattr(lmm, "sampling", None)).items():
        try:
            prepared = lmm.prepare(video, frames)[0]
        except (VideoReadError, OSError) as err:
            missing += [missing_entry(items[i].id, video, err) for i in indices]
            continue
        for i in indices:
            result = llm_attention(lmm, prepared, build_mc_question(items[i], style), max_new_tokens=max_new_tokens)
            shares.append(result.visual_share().mean(axis=0))
            parts.append(result.shares.mean(axis=(0, 1, 2)))
            ids.append(items[i].id)
            done += 1
            if progress:
                progress(done, len(items), f"llm attention: {done}/{len(items)} questions")
    if not ids:
        raise VidlmmError("No video of the multiple-choice set could be read.")
    return {"visual_share": np.stack(shares), "parts": np.stack(parts), "ids": ids, "missing": missing}


__all__ = ["LLMAttention", "PARTS", "analysis_bytes", "llm_attention", "visual_share_on_set"]
