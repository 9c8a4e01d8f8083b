"""The config API: load any run config (train_vae, train_advanced, predict, export, evaluate)
from YAML and dotted overrides, and every schema, re-exported so callers import from here.

The schemas live beside this file, one module per stage: `config_common.py` (the sections
every stage shares: experiment, data, the VAE and text-encoder references, model, diffusion;
their checks), `config_vae.py` (stage 1), `config_train.py` (stage 2), `config_predict.py`
(predict, export) and `config_evaluate.py`. Each dataclass has a `validate` that rejects
broken invariants, naming the key and the value. Reading YAML, overrides, unknown keys and
types is the generic machinery of `config_loader.py`.
"""
from __future__ import annotations

from typing import Any, Collection, Optional

from utils import config_loader
from utils.config_common import *  # noqa: F401,F403  (the schemas' API, re-exported)
from utils.config_common import PATH_FIELDS, _refuse_vae_training
from utils.config_evaluate import *  # noqa: F401,F403
from utils.config_predict import *  # noqa: F401,F403
from utils.config_train import *  # noqa: F401,F403
from utils.config_vae import *  # noqa: F401,F403

# Re-exported: callers import the whole config API from this module.
UniqueKeyLoader = config_loader.UniqueKeyLoader
config_to_dict = config_loader.config_to_dict
dump_config = config_loader.dump_config
safe_load_unique = config_loader.safe_load_unique

# Two spellings of one setting: (older alias, key). Shipped YAMLs use the key; old configs and
# checkpoints may hold the alias.
ALIASES = (("model.class_conditional", "model.conditioning"),)


def load_config(cls: type, path: Optional[str], overrides: Collection[str] = ()) -> Any:
    """YAML file + dotted `key.sub=value` overrides -> validated `cls` instance. An override of
    one spelling of an aliased setting (`ALIASES`) replaces the file's other spelling: the
    command line wins, as for any key (both on the command line and disagreeing: refused)."""
    overridden = {item.partition("=")[0].strip() for item in overrides}

    def raw_check(raw: dict, prefix: str) -> None:
        _refuse_vae_training(raw, prefix)
        for alias, key in ALIASES:
            for given, other in ((alias, key), (key, alias)):
                if given in overridden and other not in overridden:
                    section, _, name = other.rpartition(".")
                    if isinstance(raw.get(section), dict):
                        raw[section].pop(name, None)
    return config_loader.load_config(cls, path, overrides, path_fields=PATH_FIELDS, raw_check=raw_check)
