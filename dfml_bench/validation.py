"""Turn pydantic validation failures into one user-facing line that lists every bad field."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from dfml_bench.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def validate_model(
    model: type[ModelT], raw: object, what: str, context: dict[str, Any] | None = None
) -> ModelT:
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} must be a mapping of settings, got {type(raw).__name__}")
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as error:
        raise ConfigError(f"{what} is invalid: {describe(error)}") from None


def describe(error: ValidationError) -> str:
    """Every problem as `field.path: message`, on one line (pydantic's own text spans many)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in issue['loc']) or '(top level)'}: {issue['msg']}"
        for issue in error.errors()
    ).replace("\n", " ")
