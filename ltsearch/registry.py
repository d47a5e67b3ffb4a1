"""Name -> factory registries, one per extension kind (backbones, losses, augmenters, samplers, datasets).

Modelled on timm's model registry: entries register themselves with a decorator at import time, a
factory looks them up by the name written in the config, and an unknown name is an error that lists
what exists. Each entry may carry a config dataclass (its section of the YAML) and free metadata.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from ltsearch.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    config: type | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A named collection of plug-ins of one kind.

    `modules` lists the modules whose import registers the built-in entries; they are imported on the
    first lookup so that `import ltsearch` stays cheap and no hand-kept list repeats what is on disk.
    """

    def __init__(self, kind: str, *, config_key: str, modules: tuple[str, ...] = (), packages: tuple[str, ...] = ()):
        self.kind = kind
        self.config_key = config_key
        self._modules = modules
        self._packages = packages
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False

    def register(self, name: str, *, config: type | None = None, **meta: Any) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise RuntimeError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name=name, obj=obj, config=config, meta=dict(meta))
            return obj

        return decorator

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                importlib.import_module(module)
            for package in self._packages:
                for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
                    if not info.name.startswith("_"):
                        importlib.import_module(f"{package}.{info.name}")

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._entries

    def get(self, name: str) -> Entry[T]:
        self._load_builtins()
        if name not in self._entries:
            raise ConfigError(self.config_key, name, f"one of {self.names()} (registered {self.kind}s)")
        return self._entries[name]


BACKBONES: Registry[Any] = Registry("backbone", config_key="model.name", packages=("ltsearch.models",))
LOSSES: Registry[Any] = Registry("loss", config_key="loss.name", modules=("ltsearch.losses",))
AUGMENTERS: Registry[Any] = Registry("augmenter", config_key="augmenter.name", packages=("ltsearch.augmenters",))
SAMPLERS: Registry[Any] = Registry("sampler", config_key="loss.resample.sampler", modules=("ltsearch.data.samplers",), packages=("ltsearch.augmenters",))
DATASETS: Registry[Any] = Registry("dataset", config_key="data.name", packages=("ltsearch.data.sources",))
