"""resumekit as a vLLM encoder-cache (EC) connector: name this module in vLLM's config.

    --ec-transfer-config '{"ec_connector": "ResumekitECConnector",
                           "ec_connector_module_path": "resumekit.integrations.vllm",
                           "ec_role": "ec_consumer",
                           "ec_connector_extra_config": {...}}'

The encode instance takes ``"ec_role": "ec_producer"``. The connector class
(:mod:`~resumekit.integrations.vllm.connector`) needs vLLM 0.34; this package
loads it only when vLLM asks for it, so resumekit imports without vLLM and the
parts that do not touch vLLM (:mod:`.settings`, :mod:`.book`, :mod:`.rank`,
:mod:`.orders`, :mod:`.wiring`) work without it. Using the connector without
vLLM raises :class:`~resumekit.errors.IntegrationUnavailableError` naming what
to install.
"""

from __future__ import annotations

import importlib
from typing import Any, Final

from resumekit.errors import IntegrationUnavailableError

INSTALL_HINT: Final = (
    "pip install --no-deps vllm==0.34.0 and the packages pinned in requirements/vllm-cpu.txt "
    "(a GPU host: pip install vllm==0.34.0)"
)
_FROM_VLLM: Final = ("ResumekitECConnector", "ResumekitECMetadata", "ResumekitWorkerMetadata")


def __getattr__(name: str) -> Any:
    if name not in _FROM_VLLM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        importlib.import_module("vllm")
    except ImportError as error:
        raise IntegrationUnavailableError(
            f"the resumekit vLLM connector needs vLLM, which cannot be imported ({error}): "
            f"{INSTALL_HINT}"
        ) from None
    connector = importlib.import_module("resumekit.integrations.vllm.connector")
    return getattr(connector, name)


__all__ = [
    "INSTALL_HINT",
    "ResumekitECConnector",
    "ResumekitECMetadata",
    "ResumekitWorkerMetadata",
]
