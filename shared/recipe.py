"""Load a recipe from `conf/` with Hydra, apply command-line overrides, return the typed config.

    from shared.recipe import load
    cfg, node = load("qwen3-14b-4b", ["distillation.max_num_steps=5"])

`conf` is a recipe name in the repo's `conf/` directory or a path to a YAML file of the user's
(whose `defaults:` may name Sluice's recipes, e.g. `defaults: [qwen3-14b-4b, _self_]`).
Unknown keys fail with the closest valid keys; keys of the runbook's configs that Sluice
does not have fail with the reason (`shared.config.REFUSED_KEYS`).
"""

from __future__ import annotations

import difflib
from dataclasses import is_dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shared.config import REFUSED_KEYS, SluiceConfig, register
from shared.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def recipe_names() -> List[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def _schema_keys() -> List[str]:
    """Every dotted key of the schema (dict-valued fields such as optimizer.kwargs are leaves)."""
    keys: List[str] = []

    def walk(node, prefix: str) -> None:
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if not isinstance(child, DictConfig):
                continue
            if child._is_none():
                # An optional section that is null by default (teacher.generation): its keys
                # are still valid overrides.
                ref = child._metadata.ref_type
                if isinstance(ref, type) and is_dataclass(ref):
                    walk(OmegaConf.structured(ref), full + ".")
            elif child._metadata.object_type not in (dict, None):
                walk(child, full + ".")

    walk(OmegaConf.structured(SluiceConfig), "")
    return keys


def _unknown_key_error(key: str, where: str) -> UserError:
    for refused, why in REFUSED_KEYS.items():
        for candidate in (refused, refused.replace("policy.", "teacher.", 1)):
            if key == candidate or key.startswith(candidate + "."):
                return UserError(f"config error: {key} ({where}) is not used by Sluice: {why}.")
    keys = _schema_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not close:  # try the last component, e.g. a key put under the wrong section
        last = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == last][:3]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UserError(
        f"config error: unknown key {key} ({where}).{hint} "
        "Fix: correct the key; `python -m launch.run conf=NAME launch.dry_run=true` prints every key."
    )


def _resolve_conf(conf: str) -> Tuple[Path, str]:
    if conf.endswith((".yaml", ".yml")) or "/" in conf:
        path = Path(conf).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"config error: conf={conf}: no such file. Fix: give an existing YAML "
                            f"file or one of the recipes: {', '.join(recipe_names())}.")
        return path.parent, path.stem
    if not (CONF_DIR / f"{conf}.yaml").is_file():
        close = difflib.get_close_matches(conf, recipe_names(), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(f"config error: conf={conf}: no such recipe in {CONF_DIR}.{hint} "
                        f"Fix: use one of: {', '.join(recipe_names())}.")
    return CONF_DIR, conf


def _check_overrides(overrides: Sequence[str]) -> None:
    # lazy: modules that only need REPO_ROOT from here do not load Hydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:  # hydra raises OverrideParseException with a readable message
        raise UserError(f"config error: cannot parse overrides {list(overrides)}: {e}. "
                        "Fix: use key=value (Hydra override syntax).") from None
    keys = set(_schema_keys())
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra."):
            continue
        # `+key=value` would add a key the schema does not have: refuse it like any unknown key.
        if key not in keys and not any(key.startswith(k + ".") for k in FREE_FORM_KEYS):
            raise _unknown_key_error(key, "command line")


# Free-form dict fields accept any sub-key.
FREE_FORM_KEYS = ("policy.optimizer.kwargs", "teacher.optimizer.kwargs", "env",
                  "policy.tokenizer.chat_template_kwargs", "teacher.tokenizer.chat_template_kwargs")


def _key_of(exc: BaseException) -> Optional[str]:
    e: Optional[BaseException] = exc
    while e is not None:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return e.full_key
        e = e.__cause__ or e.__context__
    return None


def _messages(exc: BaseException) -> str:
    parts, e = [], exc
    while e is not None:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if msg not in parts:
            parts.append(msg)
        e = e.__cause__ or e.__context__
    return "; ".join(parts)


def _null_section(node: DictConfig, key: str) -> Optional[str]:
    """The optional section above `key` that is null in `node` (teacher.generation for
    teacher.generation.temperature), or None."""
    parts = key.lstrip("+~").split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if OmegaConf.select(node, prefix, throw_on_missing=False) is None and \
                _section_type(prefix) is not None:
            return prefix
    return None


def _section_type(dotted: str):
    """The dataclass of schema section `dotted` (e.g. GenerationConfig), or None."""
    child = OmegaConf.structured(SluiceConfig)
    for part in dotted.split("."):
        if not isinstance(child, DictConfig) or part not in child:
            return None
        child = child._get_node(part)
    ref = child._metadata.ref_type if isinstance(child, DictConfig) else None
    return ref if isinstance(ref, type) and is_dataclass(ref) else None


def _fill_null_sections(node: DictConfig, overrides: Sequence[str]) -> None:
    """Overrides of keys inside a section the recipe leaves null (teacher.generation.temperature
    =0.7): the section is created with its defaults, then the keys are set."""
    for override in overrides:
        key, _, value = override.partition("=")
        section = _null_section(node, key)
        if section is not None:
            OmegaConf.update(node, section, OmegaConf.structured(_section_type(section)),
                             merge=False)
        OmegaConf.update(node, key.lstrip("+~"), _parse_value(value), merge=True)


def _parse_value(text: str):
    """An override's value as Hydra reads it (numbers, booleans, null, lists, strings)."""
    # lazy: modules that only need REPO_ROOT from here do not load Hydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"x={text}").value()


def load(conf: str, overrides: Sequence[str] = ()) -> Tuple[SluiceConfig, DictConfig]:
    """Compose the recipe with overrides; return (typed config, resolved DictConfig)."""
    # lazy: modules that only need REPO_ROOT from here do not load Hydra
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register()
    config_dir, name = _resolve_conf(conf)
    _check_overrides(overrides)
    try:
        # Sluice's recipes stay reachable from a user's YAML elsewhere (defaults: [qwen3-14b-4b]).
        search = [f"hydra.searchpath=[file://{CONF_DIR}]"] if config_dir != CONF_DIR else []
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            try:
                node, late = compose(config_name=name, overrides=search + list(overrides)), []
            except AssertionError:
                # An override below a section the recipe leaves null (teacher.generation):
                # compose without those, then create the section and set them.
                base = compose(config_name=name, overrides=search)
                late = [o for o in overrides if _null_section(base, o.split("=", 1)[0])]
                node = compose(config_name=name,
                               overrides=search + [o for o in overrides if o not in late])
        _fill_null_sections(node, late)
        OmegaConf.resolve(node)
        typed = OmegaConf.to_object(node)
    except AssertionError:
        # OmegaConf asserts when an override goes below a section the recipe sets to null.
        raise UserError(
            "config error: an override sets a key inside a section that is null in recipe "
            f"{name}. Fix: remove the override, or give the whole section in a YAML recipe of "
            "yours.") from None
    except (HydraException, OmegaConfBaseException) as e:
        key = _key_of(e)
        text = _messages(e)
        if key and ("not in" in text or "Key '" in text and "not" in text):
            raise _unknown_key_error(key, f"recipe {name}") from None
        where = f" {key}" if key else ""
        raise UserError(f"config error:{where}: {text}. Fix: correct the value in the recipe "
                        "or the override (see the key's type in shared/config.py).") from None
    if not isinstance(typed, SluiceConfig):
        raise UserError(f"config error: recipe {name} does not use the Sluice schema. Fix: start "
                        "it with `defaults: [sluice_schema, _self_]` or a Sluice recipe.")
    return typed, node
