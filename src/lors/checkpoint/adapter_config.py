"""What a PEFT adapter config says, and whether lors can merge the adapter as a LoRA.

Checked from ``adapter_config.json`` and the base's module names only (no weights): the
type (LoRA; not DoRA, IA3, LoHa, LoKr, AdaLoRA...), features whose update is not
scale * B @ A, the rank and alpha (with PEFT's per-module patterns), target modules and
modules to save that the base lacks, and the base the adapter names.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from ..errors import CheckpointError, LorsWarning
from .reader import Checkpoint

CONFIG_NAME = "adapter_config.json"
MERGE_IT = ("merge it into the base with PEFT (PeftModel.from_pretrained(base, DIR)"
            ".merge_and_unload().save_pretrained(OUT)) and pass OUT as a full expert")
# Config fields whose update is not W + scale * B @ A on fixed matrices (when set).
_UNSUPPORTED = {
    "use_dora": "DoRA rescales each merged column by a learnt magnitude",
    "layer_replication": "layer replication adds layers the base does not have",
    "trainable_token_indices": "trainable tokens replace embedding rows outside the factors",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "target_parameters": "LoRA on bare parameters is not a module's B @ A",
    "use_qalora": "QA-LoRA pools the inputs before A",
}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module ``rank_pattern`` / ``alpha_pattern`` lookup: the value of the
    first key K with ``module`` matching the regex ``(.*\\.)?(K)$``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(path: Path) -> dict:
    """The adapter config at ``path``; CheckpointError when it is unreadable, not a LoRA,
    uses a feature whose update is not scale * B @ A, or has no valid r and lora_alpha."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable adapter config ({exc}); re-save the adapter "
                              "with PEFT's save_pretrained") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object; re-save the adapter with PEFT")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"{path}: peft_type is {config.get('peft_type')!r}; lors merges LoRA adapters "
            f"(peft_type LORA) only, whose update is scale * B @ A (IA3, LoHa, LoKr, AdaLoRA, "
            f"OFT, prompt tuning and the others are not): {MERGE_IT}")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{path}: {key} is set; {why}, so the update is not "
                                  f"scale * B @ A and lors cannot merge it as a LoRA: {MERGE_IT}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if type(r) is not int or r < 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"{path}: r = {r!r} and lora_alpha = {alpha!r}; expected a "
                              "positive integer rank and a number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise CheckpointError(f"{path}: {key} is not an object of module patterns")
    return config


def check_targets(config: dict, modules: set[str], folder: Path, base: Checkpoint) -> None:
    """Every listed target module matches some module of the base (PEFT's suffix match;
    a string is a full-match regex); ``fan_in_fan_out`` is what PEFT makes of it."""
    targets = config.get("target_modules")
    where = folder / CONFIG_NAME
    if isinstance(targets, str) and targets != "all-linear":
        try:
            found = any(re.fullmatch(targets, m) or re.fullmatch(targets, m.removeprefix("model."))
                        for m in modules)
        except re.error as exc:
            raise CheckpointError(f"{where}: target_modules {targets!r} is not a regular "
                                  f"expression ({exc}); re-save the adapter with PEFT") from exc
        if not found:
            raise CheckpointError(f"{where}: target_modules {targets!r} matches no module of "
                                  f"the base ({base.source}): the adapter is for another model")
    elif isinstance(targets, list):
        absent = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in modules)]
        if absent:
            raise CheckpointError(f"{where}: target_modules {absent} match no module of the "
                                  f"base ({base.source}): the adapter is for another model")
    if config.get("fan_in_fan_out"):
        # fan_in_fan_out describes Conv1D weights stored (in, out); Whisper's are nn.Linear
        # (out, in), for which PEFT itself ignores the flag (and resets it), so B @ A is exact.
        warnings.warn(f"{where}: fan_in_fan_out is true, but Whisper's projections are "
                      "nn.Linear, for which PEFT ignores it; lors does the same (delta "
                      "scale * B @ A, as PEFT's merge_and_unload gives)", LorsWarning,
                      stacklevel=4)


def check_modules_to_save(config: dict, saved: dict[str, str], folder: Path) -> None:
    """Every entry of ``modules_to_save`` has a copy among the ``saved`` tensors (base name
    -> stored name), matched as PEFT matches module names (equal, or a dotted suffix)."""
    saved_modules = {name.rsplit(".", 1)[0] for name in saved}
    for module in config.get("modules_to_save") or []:
        if not any(m == module or m.endswith(f".{module}") for m in saved_modules):
            raise CheckpointError(f"{folder / CONFIG_NAME}: modules_to_save lists {module!r}, "
                                  "but the adapter's weights hold no copy of it; the file is "
                                  "incomplete: re-save the adapter")


def warn_other_base(config: dict, base: Checkpoint, folder: Path) -> None:
    """Warn when ``base_model_name_or_path`` names another model than ``base`` (a LoRA
    delta fits any base of the right shapes, so this is not an error)."""
    named = config.get("base_model_name_or_path")
    if not named:
        return
    ours = {base.source, str(base.config.get("_name_or_path", ""))}
    if base.aux_dir is not None:
        ours.add(str(Path(base.aux_dir).resolve()))
    if named in ours or (Path(named).exists() and str(Path(named).resolve()) in ours):
        return
    warnings.warn(f"{folder / CONFIG_NAME}: base_model_name_or_path is {named!r}, this merge's "
                  f"base is {base.source}; the shapes fit, so the adapter is merged: check that "
                  "it was trained on this base", LorsWarning, stacklevel=4)
