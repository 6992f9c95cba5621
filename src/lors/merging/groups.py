"""Whisper parameter groups: which part of the network a tensor belongs to.

Each group gets its own merge policy (see :mod:`lors.merging.methods`), and a dry run reports
how many tensors and parameters every group matched, so a selector that matches nothing is
visible instead of silently doing nothing.
"""

from __future__ import annotations

import re

# Ordered: the first pattern that matches decides. Names are canonical HF Whisper names.
GROUP_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (group, re.compile(pattern)) for group, pattern in (
        ("encoder_self_attention", r"^model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.weight$"),
        ("decoder_self_attention", r"^model\.decoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.weight$"),
        ("cross_attention", r"^model\.decoder\.layers\.\d+\.encoder_attn\.(q|k|v|out)_proj\.weight$"),
        ("ffn", r"^model\.(encoder|decoder)\.layers\.\d+\.fc[12]\.weight$"),
        ("bias", r"^model\.(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn)\.\w+_proj\.bias$"
                 r"|^model\.(encoder|decoder)\.layers\.\d+\.fc[12]\.bias$"),
        ("layer_norm", r"layer_norm\.(weight|bias)$"),
        ("conv_frontend", r"^model\.encoder\.conv[12]\.(weight|bias)$"),
        ("token_embedding", r"^model\.decoder\.embed_tokens\.weight$|^proj_out\.weight$"),
        ("position_embedding", r"^model\.(encoder|decoder)\.embed_positions\.weight$"),
    )
)
GROUPS: tuple[str, ...] = tuple(group for group, _ in GROUP_PATTERNS) + ("other",)

# The groups LoRS prunes: the 2-D attention and feed-forward weight matrices (method.md).
MATRIX_GROUPS: frozenset[str] = frozenset(
    {"encoder_self_attention", "decoder_self_attention", "cross_attention", "ffn"}
)


def group_of(name: str) -> str:
    """The parameter group of a canonical tensor name ("other" when nothing matches)."""
    for group, pattern in GROUP_PATTERNS:
        if pattern.search(name):
            return group
    return "other"


def layer_of(name: str) -> str:
    """A short layer label for reports: ``encoder.3``, ``decoder.0``, or the top-level part."""
    match = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.", name)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    return name.removeprefix("model.").rsplit(".", 1)[0]
