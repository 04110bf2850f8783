"""Errors raised by sparse-dit. Every message says what was wrong and what to do about it."""

from __future__ import annotations


class SparseDiTError(Exception):
    """Base class of every error sparse-dit raises on purpose."""


class UnknownMethodError(SparseDiTError, KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigError(SparseDiTError, ValueError):
    """A configuration value outside its valid range, or an unknown option."""


class UnsupportedModelError(SparseDiTError, TypeError):
    """A pipeline or transformer class that no adapter in `sparse_dit.pipelines` describes."""


class ShapeError(SparseDiTError, ValueError):
    """Tensors whose shapes do not fit the plan, the token grid or each other."""


class DiffusersCompatibilityError(SparseDiTError, ImportError):
    """The installed diffusers lacks a private API sparse-dit hooks into."""
