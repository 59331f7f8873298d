"""The grouped settings of :class:`~ddpm_lightning.lit_module.DiffusionModule` (``schedule``, ``loss_weighting``,
``lr_schedule``, ``optimizer``, ``runtime``) are frozen dataclasses that read the same way from a config: the setting
itself, a mapping of its fields (YAML), None (its defaults) or, for a setting with a ``name``, a bare name."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

__all__ = ["Setting"]

S = TypeVar("S", bound="Setting")


@dataclasses.dataclass(frozen=True)
class Setting:
    """The base of a frozen dataclass setting: :meth:`parse` and :meth:`to_dict`.

    A subclass sets ``KEY`` (its key in a config, which errors name) and, when its first field is ``name``, ``NAMES``
    (the names a bare name may be). A dataclass without fields itself: jsonargparse reads a subclass's fields only
    when every class it derives from is a dataclass."""

    KEY: ClassVar[str]
    NAMES: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def parse(cls: type[S], value: Any) -> S:
        """The setting from itself, a mapping of its fields, None (the defaults) or a bare name; ValueError naming the
        setting and what it takes for anything else."""
        if isinstance(value, cls):
            return value
        fields = [f.name for f in dataclasses.fields(cls)]
        if isinstance(value, Mapping):
            if unknown := sorted(set(value) - set(fields)):
                raise ValueError(f"{cls.KEY}: unknown {', '.join(map(str, unknown))}; allowed: {', '.join(fields)}")
            return cls(**value)
        if value is None:
            return cls()
        if isinstance(value, str) and cls.NAMES:
            return cls(name=value)  # type: ignore[call-arg]
        named = f"a name ({', '.join(cls.NAMES)}) or " if cls.NAMES else ""
        raise ValueError(f"{cls.KEY} must be {named}a mapping of {', '.join(fields)}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for hyper-parameters."""
        return dataclasses.asdict(self)
