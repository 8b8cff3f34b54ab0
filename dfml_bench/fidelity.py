"""Fidelity profiles: reproduce the authors' code (quirks included) or run our corrections.

A method whose published numbers come from public code offers two profiles. `authors` (the
default) does what that code does wherever it changes a number; `corrected` applies our fixes.
Every difference is also its own named setting, so one ablation can flip one difference: a
setting left unset follows the profile, a setting given explicitly wins. docs/fidelity.md lists
every difference with the authors' file and line and its measured effect.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

Fidelity = Literal["authors", "corrected"]
FIDELITY_PROFILES: tuple[Fidelity, ...] = ("authors", "corrected")


class FidelitySettings(BaseModel):
    """Mixed into a method's settings. Subclasses map each named difference to its value under
    each profile in `PROFILE_VALUES`; those fields default to None ("follow the profile") and
    hold the resolved value after validation, so records store what actually ran."""

    fidelity: Fidelity = Field(
        "authors", description="authors: as the official code runs; corrected: our fixes"
    )
    PROFILE_VALUES: ClassVar[dict[str, dict[Fidelity, Any]]] = {}

    @model_validator(mode="after")
    def _follow_profile(self) -> FidelitySettings:
        for name, values in self.PROFILE_VALUES.items():
            if getattr(self, name) is None:
                setattr(self, name, values[self.fidelity])
        return self

    def departures(self) -> dict[str, Any]:
        """Named settings set against the chosen profile (the run is then an ablation of it)."""
        return {
            name: getattr(self, name)
            for name, values in self.PROFILE_VALUES.items()
            if getattr(self, name) != values[self.fidelity]
        }
